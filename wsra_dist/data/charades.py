"""Charades-STA (jiyanggao/TALL): `VIDEO START END##sentence` lines, durations CSV, I3D features."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from .records import DataError, QueryRecord
from .textio import read_text

FILTERS = ("clamp", "strict")


def read_durations(path: str | Path) -> dict[str, float]:
    """`Charades_v1_{train,test}.csv`: column `length` in seconds, keyed by `id`.

    An id listed twice with different lengths is refused naming both lines (the last row used to win
    silently); the same length twice is accepted."""
    path = Path(path)
    reader = csv.DictReader(io.StringIO(read_text(path, "durations"), newline=""))
    out: dict[str, float] = {}
    first_line: dict[str, int] = {}
    for row in _csv_rows(path, reader):
        vid, length = row["id"], _length(path, reader.line_num, row)
        if vid in out and out[vid] != length:
            raise DataError(f"{path}: lines {first_line[vid]} and {reader.line_num}: video {vid!r} is listed twice "
                            f"with different lengths ({out[vid]:g} and {length:g} s); keep one row per video")
        first_line.setdefault(vid, reader.line_num)
        out[vid] = length
    return out


def _csv_rows(path: Path, reader: csv.DictReader):
    """The rows, after checking the columns; a row csv cannot parse (a NUL byte, a huge field) names its line."""
    try:
        if not reader.fieldnames or "id" not in reader.fieldnames or "length" not in reader.fieldnames:
            raise DataError(f"{path}: needs columns 'id' and 'length', found {reader.fieldnames}")
        yield from reader
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: not a readable csv row: {e}") from None


def _length(path: Path, line: int, row: dict) -> float:
    """The row's `length`, or DataError naming the line (NaN would reach the shards and the loss)."""
    try:
        length = float(row["length"])
    except (TypeError, ValueError):
        length = math.nan
    if not (math.isfinite(length) and length > 0):
        raise DataError(f"{path}: line {line}: length {row.get('length')!r} of video {row.get('id')!r} is not a "
                        "positive number of seconds")
    return length


def read_annotations(
    path: str | Path, durations: dict[str, float], rule: str = "clamp", durations_file: str = "durations",
    dropped: dict[int, str] | None = None,
) -> tuple[list[QueryRecord], dict[str, int]]:
    """Parse the annotation txt and apply the defect rule.

    clamp (2D-TAN, 3,720 test queries): end clamped to the length, start >= end dropped.
    strict (CPL/CNM/SCN, 3,158): only lines with start < end <= length.
    query_id is the 0-based line number, so predictions can name a query whatever the rule.
    `dropped`, when given, is filled with {query_id: the stats key of why the rule dropped it} (evaluate skips
    predictions of those queries instead of calling them unknown).
    """
    if rule not in FILTERS:
        raise DataError(f"charades filter must be one of {FILTERS}, got {rule!r}")
    path = Path(path)
    lines = read_text(path, "annotations").splitlines()
    out: list[QueryRecord] = []
    stats = {"lines": 0, "clamped": 0, "dropped_start_ge_end": 0, "dropped_past_end": 0}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        stats["lines"] += 1
        if "##" not in line:
            raise DataError(f"{path}: line {i + 1}: no '##' separator: {line[:80]!r}")
        head, sentence = line.split("##", 1)  # seven real sentences contain '#'
        fields = head.split()
        if len(fields) != 3:
            raise DataError(f"{path}: line {i + 1}: expected 'VIDEO START END##sentence', got {line[:80]!r}")
        vid = fields[0]
        try:
            s, e = float(fields[1]), float(fields[2])
        except ValueError:
            raise DataError(f"{path}: line {i + 1}: start/end are not numbers: {line[:80]!r}") from None
        if not (math.isfinite(s) and math.isfinite(e)) or s < 0 or e < 0:
            raise DataError(f"{path}: line {i + 1}: start/end must be finite seconds >= 0, got {fields[1]} {fields[2]}")
        if not sentence.strip():
            raise DataError(f"{path}: line {i + 1}: empty description (video {vid!r})")
        if vid not in durations:
            raise DataError(f"{path}: line {i + 1}: video {vid!r} has no duration in {durations_file}")
        length = durations[vid]
        if rule == "clamp" and e > length:
            stats["clamped"] += 1
        e, why = _defect(rule, s, e, length)
        if why is not None:
            stats[why] += 1
            if dropped is not None:
                dropped[i] = why
            continue
        out.append(QueryRecord(query_id=i, video=vid, sentence=sentence.strip(), times=[[s, e]], duration=length))
    stats["kept"] = len(out)
    return out, stats


def _defect(rule: str, s: float, e: float, length: float) -> tuple[float, str | None]:
    """(end after the rule, None or the stats key of why the rule drops the line)."""
    if rule == "strict":
        if not s < e:
            return e, "dropped_start_ge_end"
        return e, ("dropped_past_end" if e > length else None)
    e = min(e, length)
    return e, ("dropped_start_ge_end" if s >= e else None)


class SnippetFeatures:
    """I3D snippet features: a folder of `{vid}.npy` (T, 1024) or (T,1,1,1024), or one HDF5 of datasets."""

    def __init__(self, source: str | Path):
        self.source = Path(source)
        self.h5 = None
        if self.source.is_dir():
            pass
        elif self.source.is_file():
            import h5py

            try:
                self.h5 = h5py.File(self.source, "r")
            except OSError as e:
                raise DataError(f"{self.source}: neither a folder of .npy nor an HDF5 file: {e}") from e
        else:
            raise DataError(f"{self.source}: no such feature folder or file")

    def __contains__(self, vid: str) -> bool:
        return (vid in self.h5) if self.h5 is not None else (self.source / f"{vid}.npy").is_file()

    def where(self, vid: str) -> str:
        return f"{self.source}:{vid}" if self.h5 is not None else str(self.source / f"{vid}.npy")

    def _raw(self, vid: str) -> np.ndarray:
        """The stored array of one video (subclasses read other layouts; get() checks it)."""
        return np.asarray(self.h5[vid][()]) if self.h5 is not None else np.load(self.source / f"{vid}.npy", allow_pickle=False)

    def get(self, vid: str) -> np.ndarray:
        try:
            x = self._raw(vid)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{self.where(vid)}: cannot read features: {e}") from e
        if x.ndim == 4 and x.shape[1:3] == (1, 1):  # (T, 1, 1, D) as some I3D releases store it
            x = x.reshape(x.shape[0], x.shape[3])
        if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise DataError(f"{self.where(vid)}: shape {x.shape}, expected (T, D) with T >= 1 snippets")
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise DataError(f"{self.where(vid)}: dtype {x.dtype} is not a real number type")
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0]
            raise DataError(f"{self.where(vid)}: contains NaN or inf (first at snippet {bad[0]}, column {bad[1]})")
        return x

    def dim(self, vid: str) -> int:
        return int(self.get(vid).shape[1])


def resample(x: np.ndarray, T: int) -> np.ndarray:
    """Mean within T equal bins (CPL's 200-bin resampling); repeats rows when the video is shorter."""
    n = x.shape[0]
    edges = np.linspace(0, n, T + 1)
    out = np.empty((T, x.shape[1]), dtype=np.float32)
    for k in range(T):
        a = int(np.floor(edges[k]))
        b = max(int(np.ceil(edges[k + 1])), a + 1)
        out[k] = x[a:min(b, n)].mean(0) if a < n else x[-1]
    return out

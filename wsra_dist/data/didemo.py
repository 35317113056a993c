"""DiDeMo (LisaAnne/LocalizingMoments): annotation JSON and per-video chunk-feature HDF5 files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..geometry import DIDEMO_CANDIDATES
from .records import DataError, QueryRecord
from .textio import read_text

KEYS = {"annotation_id": int, "description": str, "video": str, "num_segments": int, "times": list}


def read_annotations(path: str | Path) -> list[QueryRecord]:
    """Read `{train,val,test}_data.json`; every malformed record is an error naming file and index."""
    path = Path(path)
    try:
        data = json.loads(read_text(path, "DiDeMo annotations"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: cannot read DiDeMo annotations: {e}") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    out, seen = [], {}  # annotation_id -> record index, to name both records of a duplicate
    for i, r in enumerate(data):
        where = f"{path}: record {i}" + (f" (annotation_id {r.get('annotation_id')})" if isinstance(r, dict) else "")
        if not isinstance(r, dict):
            raise DataError(f"{where}: not an object")
        for k, t in KEYS.items():
            if k not in r:
                raise DataError(f"{where}: missing key {k!r}")
            if not isinstance(r[k], t) or (t is int and isinstance(r[k], bool)):
                raise DataError(f"{where}: {k!r} should be {t.__name__}, got {r[k]!r}")
        if r["annotation_id"] in seen:
            raise DataError(f"{path}: records {seen[r['annotation_id']]} and {i}: duplicate annotation_id "
                            f"{r['annotation_id']} (an id names one query)")
        seen[r["annotation_id"]] = i
        if not r["description"].strip():
            raise DataError(f"{where}: empty description")
        if not 1 <= r["num_segments"] <= 6:
            raise DataError(f"{where}: num_segments {r['num_segments']} outside 1..6")
        if not r["times"]:
            raise DataError(f"{where}: 'times' is empty")
        for t in r["times"]:
            if not (isinstance(t, list) and len(t) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in t)):
                raise DataError(f"{where}: each entry of 'times' must be [start_chunk, end_chunk], got {t!r}")
            if not (0 <= t[0] <= t[1] <= 5):
                raise DataError(f"{where}: chunk pair {t} outside 0 <= s <= e <= 5")
        out.append(QueryRecord(
            query_id=r["annotation_id"], video=r["video"], sentence=r["description"],
            times=[list(t) for t in r["times"]], duration=5.0 * r["num_segments"], num_segments=r["num_segments"],
        ))
    return out


class FeatureFiles:
    """One or more DiDeMo feature files (RGB fc7, flow): one (6, D) dataset per video, keyed by name."""

    def __init__(self, paths: Sequence[str | Path]):
        import h5py

        if not paths:
            raise DataError("no DiDeMo feature file given (--features FILE.h5)")
        self.paths = [Path(p) for p in paths]
        self.files = []
        for p in self.paths:
            try:
                self.files.append(h5py.File(p, "r"))
            except OSError as e:
                raise DataError(f"{p}: cannot open HDF5 feature file: {e}") from e
        self.dims = []
        for p, f in zip(self.paths, self.files):
            first = next(iter(f.keys()), None)
            if first is None:
                raise DataError(f"{p}: no datasets")
            self.dims.append(int(f[first].shape[-1]))

    def __contains__(self, video: str) -> bool:
        return all(video in f for f in self.files)

    def missing_from(self, video: str) -> list[str]:
        return [str(p) for p, f in zip(self.paths, self.files) if video not in f]

    def chunks(self, video: str) -> list[np.ndarray]:
        out = []
        import h5py

        for p, f, dim in zip(self.paths, self.files, self.dims):
            node = f.get(video)
            if not isinstance(node, h5py.Dataset):
                raise DataError(f"{p}: {video!r} is " + ("missing" if node is None else "a group, not a (6, D) dataset"))
            try:
                x = np.asarray(node[()], dtype=np.float64)
            except (TypeError, ValueError, OSError) as e:
                raise DataError(f"{p}: dataset {video!r} is not numeric: {e}") from e
            if x.ndim != 2 or x.shape[0] != 6 or x.shape[1] != dim:
                raise DataError(f"{p}: dataset {video!r} has shape {x.shape}, expected (6, {dim}) like the file's "
                                f"first dataset")
            if not np.isfinite(x).all():
                raise DataError(f"{p}: dataset {video!r} contains NaN or inf")
            out.append(x)
        return out

    def close(self) -> None:
        for f in self.files:
            f.close()


def majority_candidate(times: Sequence[Sequence[int]]) -> int:
    """Index in DIDEMO_CANDIDATES of the most chosen pair (first chosen wins ties)."""
    counts: dict[tuple, int] = {}
    for t in times:
        counts[tuple(t)] = counts.get(tuple(t), 0) + 1
    best = max(counts.items(), key=lambda kv: kv[1])[0]
    return DIDEMO_CANDIDATES.index(best)

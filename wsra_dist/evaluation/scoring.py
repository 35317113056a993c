"""Prediction files -> metrics, checking every annotated query is predicted exactly once."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..data.records import DataError
from ..data.textio import bounded_lines
from . import formats
from . import metrics as M

DIDEMO_KEYS = ("R@1", "R@5", "mIoU")
CHARADES_KEYS = ("R@1,IoU=0.3", "R@1,IoU=0.5", "R@1,IoU=0.7", "R@5,IoU=0.3", "R@5,IoU=0.5", "R@5,IoU=0.7", "mIoU")
ACTIVITYNET_KEYS = ("R@1,IoU=0.1", "R@1,IoU=0.3", "R@1,IoU=0.5", "R@5,IoU=0.1", "R@5,IoU=0.3", "R@5,IoU=0.5", "mIoU")
KEYS = {"didemo": DIDEMO_KEYS, "charades": CHARADES_KEYS, "activitynet": ACTIVITYNET_KEYS}  # metrics.json, tables
# The protocols in seconds (one ground-truth span per query, R@n at IoU m): their thresholds and names.
IOUS = {"charades": M.CHARADES_IOUS, "activitynet": M.ACTIVITYNET_IOUS}
NAMES = {"didemo": "DiDeMo", "charades": "Charades-STA", "activitynet": "ActivityNet Captions"}
# One prediction line may hold this many bytes (1 MiB, its line end included); `evaluate --help` states it.  The
# longest real lines are moment_detr lines of a few hundred windows (~10 KB); a line over the cap is refused as soon
# as that many bytes are read, so memory stays bounded (an unbounded read took 2.8 GB for a 190 MB line).
MAX_LINE_BYTES = 1 << 20


def read_predictions(path: str | Path, protocol: str, clip_predictions: bool = False) -> list[dict]:
    """A JSONL prediction file -> prediction dicts; every line is checked (see read_predictions_located)."""
    return read_predictions_located(path, protocol, clip_predictions)[0]


def read_predictions_located(path: str | Path, protocol: str,
                             clip_predictions: bool = False) -> tuple[list[dict], dict]:
    """(predictions in the native form, {id: "FILE: line N"}).

    Each file holds one format, detected by its keys (formats.detect): native lines (the id key and
    'moments') or moment_detr / lighthouse lines ('qid' and 'pred_relevant_windows', converted by
    formats.from_md), so both are scored alike.  Refused with DataError naming the file and line(s): lines
    that are not JSON objects of one format with its keys, a file mixing formats; DiDeMo rankings that are
    not a permutation of the 21 candidates (or moment_detr windows off the 5-second grid); Charades-STA
    moments that are not [start, end] numbers, hold NaN/inf, or (unless `clip_predictions`) have end < start
    or start < 0.  The duration check needs the annotations and is made by score_charades, which names the
    line through the returned locations (an id on several lines maps to "FILE: lines N, M")."""
    path = Path(path)
    id_key = formats.protocol(protocol).id_key
    out, lines, bad = [], {}, []
    first: tuple[str, int] | None = None  # (format, line) of the file's first prediction
    for i, obj in json_lines(path):
        fmt = _located(path, i, formats.detect, obj, protocol)
        if first is None:
            first = (fmt, i)
        elif fmt != first[0]:
            raise DataError(f"{path}: line {i}: a {formats.format_name(fmt, protocol)} line in a file whose line "
                            f"{first[1]} is {formats.format_name(first[0], protocol)}; a file holds one format")
        if fmt == formats.MOMENT_DETR:
            p, why = _located(path, i, formats.from_md, obj, protocol)
            label = f"{formats.MD_ID} {p[id_key]!r}"
        else:
            _located(path, i, _check_native_shape, obj, id_key, protocol)
            p, why, label = obj, None, f"{id_key} {obj[id_key]!r}"
        why = why or _moments_problem(p["moments"], protocol, clip_predictions)
        if why is not None:
            bad.append(f"line {i} ({label}): {why}")
        lines.setdefault(p[id_key], []).append(i)
        out.append(p)
    if bad:
        what = ("DiDeMo rankings are not a full ranking of the 21 candidates (the official eval.py needs every "
                "candidate, each once)" if protocol == "didemo" else
                f"{NAMES.get(protocol, protocol)} predictions hold invalid moments")
        raise DataError(f"{path}: {len(bad)} {what}: " + "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else ""))
    where = {k: f"{path}: line {v[0]}" if len(v) == 1 else
             f"{path}: lines {', '.join(map(str, v[:3]))}" + (", ..." if len(v) > 3 else "") for k, v in lines.items()}
    return out, where


def json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of every non-blank line; lines over MAX_LINE_BYTES and bytes that are not
    UTF-8 are refused with the line (textio.bounded_lines: memory stays bounded by the cap)."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read predictions: {e.strerror or e}") from None
    with f:
        for i, line in bounded_lines(f, path, MAX_LINE_BYTES):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i}: not JSON: {e}") from e


def _located(path: Path, line: int, fn: Callable, *args):
    """fn(*args), its DataError prefixed with the file and line (formats.py knows no files)."""
    try:
        return fn(*args)
    except DataError as e:
        raise DataError(f"{path}: line {line}: {e}") from None


def _check_native_shape(p: dict, id_key: str, protocol: str) -> None:
    if id_key not in p or "moments" not in p:
        raise DataError(f"needs keys {id_key!r} and 'moments'")
    if not isinstance(p[id_key], int) or isinstance(p[id_key], bool):
        raise DataError(f"{id_key} must be an integer, got {p[id_key]!r}")
    mom = p["moments"]
    if not isinstance(mom, list) or not mom or not all(isinstance(m, (list, tuple)) and len(m) == 2 for m in mom):
        raise DataError("'moments' must be a non-empty list of [start, end] pairs")
    if protocol == "didemo" and not all(isinstance(x, int) and not isinstance(x, bool) for m in mom for x in m):
        raise DataError("DiDeMo moments are integer chunk pairs [s, e]")


def _moments_problem(moments: list, protocol: str, clip_predictions: bool) -> str | None:
    if protocol == "didemo":
        return M.didemo_ranking_problem(moments)
    return M.charades_moment_problem(moments, None, clip_predictions)[0]


def _examples(ids: Sequence, id_key: str, where: dict | None) -> str:
    shown = [f"{id_key} {k}" + (f" ({where[k]})" if where and k in where else "") for k in ids[:5]]
    return "e.g. " + ", ".join(shown)


def _match(preds: Sequence[dict], ids: Sequence[int], id_key: str, where: dict | None = None) -> dict:
    counts = Counter(p[id_key] for p in preds)
    dup = [k for k, c in counts.items() if c > 1]
    want = set(ids)
    missing = [i for i in ids if i not in counts]
    extra = [k for k in counts if k not in want]
    problems = []
    if missing:
        problems.append(f"{len(missing)} annotated queries have no prediction ({_examples(missing, id_key, None)})")
    if extra:
        problems.append(f"{len(extra)} predictions name no annotated query ({_examples(extra, id_key, where)})")
    if dup:
        problems.append(f"{len(dup)} queries are predicted more than once ({_examples(dup, id_key, where)})")
    if problems:
        raise DataError("; ".join(problems))
    return {p[id_key]: p for p in preds}


def _check_videos(by_id: dict, truth: Sequence[dict], id_key: str, where: dict | None) -> None:
    """A prediction naming a video (native 'video', moment_detr 'vid') must name its query's annotated video:
    a mismatch means the ids are misaligned (another split's or another tool's numbering)."""
    bad = [(t["query_id"], by_id[t["query_id"]]["video"], t["video"]) for t in truth
           if "video" in t and by_id[t["query_id"]].get("video") not in (None, t["video"])]
    if bad:
        shown = "; ".join((f"{where[k]}: " if where and k in where else "") + f"{id_key} {k}: video {v!r} but the "
                          f"annotations give {a!r}" for k, v, a in bad[:3])
        raise DataError(f"{len(bad)} predictions name another video than their annotated query: {shown}"
                        + ("; ..." if len(bad) > 3 else ""))


def score_didemo(preds: Sequence[dict], truth: Sequence[dict], where: dict | None = None) -> dict[str, float]:
    """truth: dicts with query_id and times (annotator chunk pairs).  Every ranking must be a permutation
    of the 21 candidates (DataError naming a few ids, and their lines through `where`, otherwise)."""
    by_id = _match(preds, [t["query_id"] for t in truth], "annotation_id", where)
    _check_videos(by_id, truth, "annotation_id", where)
    raw = [by_id[t["query_id"]]["moments"] for t in truth]
    M.check_didemo_rankings(raw, [t["query_id"] for t in truth], where)
    rankings = [[M.as_chunk_pair(m) for m in r] for r in raw]
    return M.didemo_metrics(rankings, [t["times"] for t in truth], check=False)


def charades_moments(preds: Sequence[dict], truth: Sequence[dict], clip_predictions: bool = False,
                     where: dict | None = None, name: str = "Charades-STA") -> list[np.ndarray]:
    """Each truth query's predicted moments as a (K, 2) array, checked against its duration (see
    metrics.charades_moment_problem; truth without 'duration' skips the upper bound)."""
    by_id = _match(preds, [t["query_id"] for t in truth], "query_id", where)
    _check_videos(by_id, truth, "query_id", where)
    out, bad = [], []
    for t in truth:
        why, a = M.charades_moment_problem(by_id[t["query_id"]]["moments"], t.get("duration"), clip_predictions)
        if why is not None:
            loc = (where or {}).get(t["query_id"])
            bad.append(f"{loc + ': ' if loc else ''}query_id {t['query_id']}: {why}")
        out.append(a)
    if bad:
        raise DataError(f"{len(bad)} of {len(truth)} {name} predictions hold invalid moments (finite "
                        f"[start, end] with 0 <= start <= end <= duration, {M.MOMENT_TOLERANCE:g} s tolerance): "
                        + "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else ""))
    return out


def score_charades(preds: Sequence[dict], truth: Sequence[dict], strict: bool = False,
                   nms: float | None = None, clip_predictions: bool = False, iou_tolerance: float = 0.0,
                   where: dict | None = None, protocol: str = "charades") -> dict[str, float]:
    """Official R@n,IoU=m (plain >= m; `strict` >; `iou_tolerance` loosens it, off by default) and mIoU.
    Invalid moments are refused (DataError) unless `clip_predictions` orders and clips them into
    [0, duration]; NaN/inf is always refused.  `protocol` picks the thresholds: charades 0.3/0.5/0.7,
    activitynet 0.1/0.3/0.5 (the same rules otherwise)."""
    moments = charades_moments(preds, truth, clip_predictions, where, NAMES[protocol])
    gts = np.asarray([t["times"][0] for t in truth], dtype=np.float64)
    return M.charades_metrics(moments, gts, ious=IOUS[protocol], strict=strict, nms_thresh=nms,
                              iou_tolerance=iou_tolerance)


def reference_rows(protocol: str, truth: Sequence[dict], strict: bool = False,
                   iou_tolerance: float = 0.0) -> dict[str, dict[str, float]]:
    """Chance (exact expectation) and upper bound for exactly these queries."""
    from ..geometry import benchmark_windows

    if protocol == "didemo":
        times = [t["times"] for t in truth]
        return {"Chance": M.didemo_chance(times),
                "Upper bound": M.didemo_metrics([M.didemo_oracle_ranking(t) for t in times], times)}
    ch, orc = M.charades_chance_oracle([benchmark_windows(protocol, t["duration"]) for t in truth],
                                       np.asarray([t["times"][0] for t in truth]), ious=IOUS[protocol],
                                       strict=strict, iou_tolerance=iou_tolerance)
    return {"Chance": ch, "Upper bound": orc}

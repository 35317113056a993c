"""Prediction files -> metrics, checking every annotated query is predicted exactly once."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.records import DataError
from . import metrics as M

DIDEMO_KEYS = ("R@1", "R@5", "mIoU")
CHARADES_KEYS = ("R@1,IoU=0.3", "R@1,IoU=0.5", "R@1,IoU=0.7", "R@5,IoU=0.3", "R@5,IoU=0.5", "R@5,IoU=0.7", "mIoU")


def read_predictions(path: str | Path, protocol: str, clip_predictions: bool = False) -> list[dict]:
    """A JSONL prediction file -> prediction dicts; every line is checked (see read_predictions_located)."""
    return read_predictions_located(path, protocol, clip_predictions)[0]


def read_predictions_located(path: str | Path, protocol: str,
                             clip_predictions: bool = False) -> tuple[list[dict], dict]:
    """(predictions, {id: "FILE: line N"}).  Refused with DataError naming the file and line(s):
    lines that are not JSON objects with the id key and 'moments'; DiDeMo rankings that are not a
    permutation of the 21 candidates; Charades-STA moments that are not [start, end] numbers, hold
    NaN/inf, or (unless `clip_predictions`) have end < start or start < 0.  The duration check needs the
    annotations and is made by score_charades, which names the line through the returned locations."""
    path = Path(path)
    id_key = "annotation_id" if protocol == "didemo" else "query_id"
    out, where, bad = [], {}, []
    try:
        f = path.open()
    except OSError as e:
        raise DataError(f"{path}: cannot read predictions: {e}") from e
    with f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                p = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i}: not JSON: {e}") from e
            if not isinstance(p, dict) or id_key not in p or "moments" not in p:
                raise DataError(f"{path}: line {i}: needs keys {id_key!r} and 'moments'")
            if not isinstance(p[id_key], int) or isinstance(p[id_key], bool):
                raise DataError(f"{path}: line {i}: {id_key} must be an integer, got {p[id_key]!r}")
            mom = p["moments"]
            if not isinstance(mom, list) or not mom or not all(isinstance(m, (list, tuple)) and len(m) == 2 for m in mom):
                raise DataError(f"{path}: line {i}: 'moments' must be a non-empty list of [start, end] pairs")
            if protocol == "didemo":
                if not all(isinstance(x, int) and not isinstance(x, bool) for m in mom for x in m):
                    raise DataError(f"{path}: line {i}: DiDeMo moments are integer chunk pairs [s, e]")
                why = M.didemo_ranking_problem(mom)
            else:
                why, _ = M.charades_moment_problem(mom, None, clip_predictions)
            if why is not None:
                bad.append(f"line {i} ({id_key} {p.get(id_key)!r}): {why}")
            where.setdefault(p[id_key], f"{path}: line {i}")
            out.append(p)
    if bad:
        what = ("DiDeMo rankings are not a full ranking of the 21 candidates (the official eval.py needs every "
                "candidate, each once)" if protocol == "didemo" else "Charades-STA predictions hold invalid moments")
        raise DataError(f"{path}: {len(bad)} {what}: " + "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else ""))
    return out, where


def _match(preds: Sequence[dict], ids: Sequence[int], id_key: str) -> dict:
    counts = Counter(p[id_key] for p in preds)
    dup = [k for k, c in counts.items() if c > 1]
    want = set(ids)
    missing = [i for i in ids if i not in counts]
    extra = [k for k in counts if k not in want]
    problems = []
    if missing:
        problems.append(f"{len(missing)} annotated queries have no prediction (e.g. {id_key} {missing[:5]})")
    if extra:
        problems.append(f"{len(extra)} predictions name no annotated query (e.g. {id_key} {extra[:5]})")
    if dup:
        problems.append(f"{len(dup)} queries are predicted more than once (e.g. {id_key} {dup[:5]})")
    if problems:
        raise DataError("; ".join(problems))
    return {p[id_key]: p for p in preds}


def score_didemo(preds: Sequence[dict], truth: Sequence[dict], where: dict | None = None) -> dict[str, float]:
    """truth: dicts with query_id and times (annotator chunk pairs).  Every ranking must be a permutation
    of the 21 candidates (DataError naming a few ids, and their lines through `where`, otherwise)."""
    by_id = _match(preds, [t["query_id"] for t in truth], "annotation_id")
    raw = [by_id[t["query_id"]]["moments"] for t in truth]
    M.check_didemo_rankings(raw, [t["query_id"] for t in truth], where)
    rankings = [[M.as_chunk_pair(m) for m in r] for r in raw]
    return M.didemo_metrics(rankings, [t["times"] for t in truth], check=False)


def charades_moments(preds: Sequence[dict], truth: Sequence[dict], clip_predictions: bool = False,
                     where: dict | None = None) -> list[np.ndarray]:
    """Each truth query's predicted moments as a (K, 2) array, checked against its duration (see
    metrics.charades_moment_problem; truth without 'duration' skips the upper bound)."""
    by_id = _match(preds, [t["query_id"] for t in truth], "query_id")
    out, bad = [], []
    for t in truth:
        why, a = M.charades_moment_problem(by_id[t["query_id"]]["moments"], t.get("duration"), clip_predictions)
        if why is not None:
            loc = (where or {}).get(t["query_id"])
            bad.append(f"{loc + ': ' if loc else ''}query_id {t['query_id']}: {why}")
        out.append(a)
    if bad:
        raise DataError(f"{len(bad)} of {len(truth)} Charades-STA predictions hold invalid moments (finite "
                        f"[start, end] with 0 <= start <= end <= duration, {M.MOMENT_TOLERANCE:g} s tolerance): "
                        + "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else ""))
    return out


def score_charades(preds: Sequence[dict], truth: Sequence[dict], strict: bool = False,
                   nms: float | None = None, clip_predictions: bool = False, iou_tolerance: float = 0.0,
                   where: dict | None = None) -> dict[str, float]:
    """Official R@n,IoU=m (plain >= m; `strict` >; `iou_tolerance` loosens it, off by default) and mIoU.
    Invalid moments are refused (DataError) unless `clip_predictions` orders and clips them into
    [0, duration]; NaN/inf is always refused."""
    moments = charades_moments(preds, truth, clip_predictions, where)
    gts = np.asarray([t["times"][0] for t in truth], dtype=np.float64)
    return M.charades_metrics(moments, gts, strict=strict, nms_thresh=nms, iou_tolerance=iou_tolerance)


def reference_rows(protocol: str, truth: Sequence[dict], strict: bool = False,
                   iou_tolerance: float = 0.0) -> dict[str, dict[str, float]]:
    """Chance (exact expectation) and upper bound for exactly these queries."""
    from ..geometry import proportional_windows

    if protocol == "didemo":
        times = [t["times"] for t in truth]
        return {"Chance": M.didemo_chance(times),
                "Upper bound": M.didemo_metrics([M.didemo_oracle_ranking(t) for t in times], times)}
    ch, orc = M.charades_chance_oracle([proportional_windows(t["duration"]) for t in truth],
                                       np.asarray([t["times"][0] for t in truth]), strict=strict,
                                       iou_tolerance=iou_tolerance)
    return {"Chance": ch, "Upper bound": orc}

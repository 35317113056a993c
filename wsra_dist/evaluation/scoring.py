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


def read_predictions(path: str | Path, protocol: str) -> list[dict]:
    path = Path(path)
    id_key = "annotation_id" if protocol == "didemo" else "query_id"
    out = []
    with path.open() as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                p = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i}: not JSON: {e}") from e
            if not isinstance(p, dict) or id_key not in p or "moments" not in p:
                raise DataError(f"{path}: line {i}: needs keys {id_key!r} and 'moments'")
            mom = p["moments"]
            if not isinstance(mom, list) or not mom or not all(isinstance(m, (list, tuple)) and len(m) == 2 for m in mom):
                raise DataError(f"{path}: line {i}: 'moments' must be a non-empty list of [start, end] pairs")
            if protocol == "didemo" and not all(isinstance(x, int) for m in mom for x in m):
                raise DataError(f"{path}: line {i}: DiDeMo moments are integer chunk pairs [s, e]")
            out.append(p)
    return out


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


def score_didemo(preds: Sequence[dict], truth: Sequence[dict]) -> dict[str, float]:
    """truth: dicts with query_id and times (annotator chunk pairs)."""
    by_id = _match(preds, [t["query_id"] for t in truth], "annotation_id")
    rankings = [[tuple(m) for m in by_id[t["query_id"]]["moments"]] for t in truth]
    return M.didemo_metrics(rankings, [t["times"] for t in truth])


def score_charades(preds: Sequence[dict], truth: Sequence[dict], strict: bool = False,
                   nms: float | None = None) -> dict[str, float]:
    by_id = _match(preds, [t["query_id"] for t in truth], "query_id")
    moments = [np.asarray(by_id[t["query_id"]]["moments"], dtype=np.float64) for t in truth]
    gts = np.asarray([t["times"][0] for t in truth], dtype=np.float64)
    return M.charades_metrics(moments, gts, strict=strict, nms_thresh=nms)


def reference_rows(protocol: str, truth: Sequence[dict], strict: bool = False) -> dict[str, dict[str, float]]:
    """Chance (exact expectation) and upper bound for exactly these queries."""
    from .candidates import proportional_windows

    if protocol == "didemo":
        times = [t["times"] for t in truth]
        return {"Chance": M.didemo_chance(times),
                "Upper bound": M.didemo_metrics([M.didemo_oracle_ranking(t) for t in times], times)}
    ch, orc = M.charades_chance_oracle([proportional_windows(t["duration"]) for t in truth],
                                       np.asarray([t["times"][0] for t in truth]), strict=strict)
    return {"Chance": ch, "Upper bound": orc}

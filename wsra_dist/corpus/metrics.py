"""VCMR metrics, chance and the prior's expectation: pure functions (a slow loop reference is in the tests).

A query's ranking is a list of candidate indices into the corpus (best first).  A candidate is a hit at IoU m
when it is in the query's video and its IoU with the query's moment is >= m (DiDeMo: on the 5-s chunk grid,
inclusive chunks, against the majority moment; otherwise seconds).  R@k,IoU=m: share of queries with a hit
among the first k.  video_R@k: the query's video among the first k distinct videos of the ranking.
"""

from __future__ import annotations

from math import comb
from typing import Sequence

import numpy as np

KS = (1, 10, 100)
IOUS = (0.5, 0.7)
VIDEO_KS = (1, 10)


def metric_keys() -> list[str]:
    """The contract's metrics.json keys, in table order."""
    return [f"R@{k},IoU={m}" for m in IOUS for k in KS] + [f"video_R@{k}" for k in VIDEO_KS]


def interval_iou_1d(s: np.ndarray, e: np.ndarray, gs: float, ge: float) -> np.ndarray:
    """IoU of intervals [s, e] with [gs, ge] (same units; for DiDeMo chunk pairs pass e + 1, gs, ge + 1)."""
    inter = np.clip(np.minimum(e, ge) - np.maximum(s, gs), 0, None)
    union = np.maximum(e, ge) - np.minimum(s, gs)
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def hit_mask(starts: np.ndarray, ends: np.ndarray, video_of: np.ndarray, video: int, moment: Sequence[float],
             m: float) -> np.ndarray:
    """(M,) bool: the corpus candidates that are hits at IoU m for a query of `video` with `moment`."""
    out = np.zeros(len(starts), dtype=bool)
    own = np.flatnonzero(video_of == video)
    out[own] = interval_iou_1d(starts[own], ends[own], float(moment[0]), float(moment[1])) >= m - 1e-9
    return out


def first_hit_rank(ranking: np.ndarray, hits: np.ndarray) -> int:
    """1-based position of the first hit in `ranking` (0: none in it)."""
    pos = np.flatnonzero(hits[ranking])
    return int(pos[0]) + 1 if len(pos) else 0


def video_rank(ranking_videos: np.ndarray, video: int) -> int:
    """1-based position of `video` among the distinct videos of a ranking, in first-appearance order (0: absent)."""
    _, first = np.unique(ranking_videos, return_index=True)
    order = ranking_videos[np.sort(first)]
    pos = np.flatnonzero(order == video)
    return int(pos[0]) + 1 if len(pos) else 0


def recall(ranks: Sequence[int], k: int) -> float:
    """Percent of queries whose first hit is within k (rank 0 = none)."""
    r = np.asarray(ranks)
    return 100.0 * float(np.mean((r >= 1) & (r <= k))) if len(r) else float("nan")


def metrics_from_ranks(hit_ranks: dict[float, Sequence[int]], video_ranks: Sequence[int]) -> dict[str, float]:
    """{m: first-hit ranks per query}, video ranks -> the metrics.json dict."""
    out = {f"R@{k},IoU={m}": recall(hit_ranks[m], k) for m in IOUS for k in KS}
    out.update({f"video_R@{k}": recall(video_ranks, k) for k in VIDEO_KS})
    return out


# ---------------------------------------------------------------------------------------------- baselines
def chance_recall(n_candidates: int, n_hits: int, k: int) -> float:
    """P(a uniformly random order of M candidates puts one of h hits in its first k) = 1 - C(M-h, k) / C(M, k)."""
    M, h, k = n_candidates, n_hits, min(k, n_candidates)
    if h <= 0:
        return 0.0
    return 1.0 - comb(M - h, k) / comb(M, k)


def chance_metrics(n_candidates: int, n_hits: dict[float, Sequence[int]], n_videos: int) -> dict[str, float]:
    """Exact expectation of every metric under a random ranking of all candidates (videos: a random video order)."""
    out = {f"R@{k},IoU={m}": 100.0 * float(np.mean([chance_recall(n_candidates, h, k) for h in n_hits[m]]))
           for m in IOUS for k in KS}
    out.update({f"video_R@{k}": 100.0 * min(k, n_videos) / n_videos for k in VIDEO_KS})
    return out


def interleaved_prior_recall(hit_positions: Sequence[int], n_videos: int, k: int) -> float:
    """Expected hit@k when videos come in a uniformly random order and candidates are interleaved by their rank
    inside each video (every video's 1st candidate, then every 2nd, ...): the j-th candidate (1-based) of the
    video at position p (1..V) is at (j - 1) V + p.  `hit_positions`: the j of the query's hits in its video."""
    if not len(hit_positions):
        return 0.0
    j = min(hit_positions)
    # hit within k  <=>  (j - 1) V + p <= k  <=>  p <= k - (j - 1) V
    return min(max(k - (j - 1) * n_videos, 0), n_videos) / n_videos

"""Official metrics: DiDeMo (LocalizingMoments utils/eval.py) and Charades-STA R@n,IoU=m and mIoU.

Pure functions of rankings and annotations; the exact chance and oracle rows live here too.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from typing import Sequence

import numpy as np

from .candidates import DIDEMO_CANDIDATES

Pair = tuple[int, int]


# ------------------------------------------------------------------------------------ DiDeMo
def didemo_iou(p: Sequence[int], g: Sequence[int]) -> float:
    """IoU on inclusive chunk indices."""
    inter = max(0, min(p[1], g[1]) + 1 - max(p[0], g[0]))
    union = max(p[1], g[1]) + 1 - min(p[0], g[0])
    return inter / union if union > 0 else 0.0


def didemo_query(ranking: Sequence[Pair], times: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(rank, IoU) of one query: mean of the 3 smallest annotator ranks, mean of the 3 largest IoUs of
    the top-1 moment.  Duplicate annotator pairs count separately; a pair absent from the ranking
    has no rank (as in the reference, which skips it)."""
    pos = {tuple(p): i + 1 for i, p in reversed(list(enumerate(map(tuple, ranking))))}
    ranks = sorted(pos[tuple(t)] for t in times if tuple(t) in pos)
    rank = float(np.mean(ranks[:3])) if ranks else math.inf
    ious = sorted(didemo_iou(ranking[0], t) for t in times)
    return rank, float(np.mean(ious[-3:]))


def didemo_metrics(rankings: Sequence[Sequence[Pair]], times: Sequence[Sequence[Sequence[int]]]) -> dict[str, float]:
    """R@1, R@5, mIoU in percent."""
    rs, ious = zip(*(didemo_query(r, t) for r, t in zip(rankings, times))) if rankings else ((), ())
    rs, ious = np.asarray(rs), np.asarray(ious)
    return {"R@1": 100 * float(np.mean(rs <= 1)), "R@5": 100 * float(np.mean(rs <= 5)), "mIoU": 100 * float(np.mean(ious))}


def _order_stat_probs(n: int, d: int, k: int):
    """Joint law of the k smallest of a uniform random d-subset of {1..n}: yields (positions, prob)."""
    total = math.comb(n, d)
    for pos in itertools.combinations(range(1, n + 1), k):
        p = math.comb(n - pos[-1], d - k) / total
        if p:
            yield pos, p


@functools.lru_cache(maxsize=None)
def _chance_ranks(multiplicities: tuple[int, ...], n: int) -> tuple[float, float]:
    """Exact P(rank <= 1), P(rank <= 5) when the distinct annotated pairs have these multiplicities."""
    d = len(multiplicities)
    k = min(d, 3)
    r1 = r5 = 0.0
    # Every ordering of which distinct pairs come first is equally likely, independent of positions.
    orders = list(itertools.permutations(range(d), k))
    for pos, p in _order_stat_probs(n, d, k):
        for order in orders:
            ranks: list[int] = []
            for c, r in zip(order, pos):
                ranks += [r] * multiplicities[c]
            rank = float(np.mean(sorted(ranks)[:3]))
            r1 += p / len(orders) * (rank <= 1)
            r5 += p / len(orders) * (rank <= 5)
    return r1, r5


def didemo_chance_query(times: Sequence[Sequence[int]], n: int = 21) -> tuple[float, float, float]:
    """Exact expectation of (R@1, R@5, IoU) of one query under a uniformly random ranking of n candidates."""
    valid = [tuple(t) for t in times if tuple(t) in set(DIDEMO_CANDIDATES)]
    mult = tuple(sorted(Counter(valid).values(), reverse=True))
    r1, r5 = _chance_ranks(mult, n) if mult else (0.0, 0.0)
    miou = float(np.mean([np.mean(sorted(didemo_iou(c, t) for t in times)[-3:]) for c in DIDEMO_CANDIDATES]))
    return r1, r5, miou


def didemo_chance(times: Sequence[Sequence[Sequence[int]]]) -> dict[str, float]:
    rows = np.asarray([didemo_chance_query(t) for t in times])
    return {"R@1": 100 * rows[:, 0].mean(), "R@5": 100 * rows[:, 1].mean(), "mIoU": 100 * rows[:, 2].mean()}


def didemo_oracle_ranking(times: Sequence[Sequence[int]]) -> list[Pair]:
    """Candidates by how many annotators chose them (ties in candidate order): the upper bound."""
    c = Counter(tuple(t) for t in times)
    return sorted(DIDEMO_CANDIDATES, key=lambda p: -c.get(p, 0))


# ------------------------------------------------------------------------------ Charades-STA
CHARADES_IOUS = (0.3, 0.5, 0.7)


def interval_iou(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    """IoU of seconds intervals, no +1; broadcasts over leading dims.  Zero-length union -> 0."""
    p, g = np.asarray(p, dtype=np.float64), np.asarray(g, dtype=np.float64)
    inter = np.clip(np.minimum(p[..., 1], g[..., 1]) - np.maximum(p[..., 0], g[..., 0]), 0, None)
    union = np.maximum(p[..., 1], g[..., 1]) - np.minimum(p[..., 0], g[..., 0])
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(moments: np.ndarray, thresh: float) -> np.ndarray:
    """Greedy NMS on a best-first list (keeps order)."""
    keep: list[int] = []
    for i in range(len(moments)):
        if all(interval_iou(moments[i], moments[j]) <= thresh for j in keep):
            keep.append(i)
    return moments[keep]


def charades_metrics(
    moments: Sequence[np.ndarray], gts: np.ndarray, ious: Sequence[float] = CHARADES_IOUS,
    ns: Sequence[int] = (1, 5), strict: bool = False, nms_thresh: float | None = None,
) -> dict[str, float]:
    """R@n,IoU=m (hit if any of the top n reaches m; `strict` uses >) and mIoU (top-1), percent."""
    hits = {(n, m): [] for n in ns for m in ious}
    top1 = []
    for mom, g in zip(moments, gts):
        mom = np.asarray(mom, dtype=np.float64).reshape(-1, 2)
        if nms_thresh is not None:
            mom = nms(mom, nms_thresh)
        iou = interval_iou(mom, np.asarray(g)[None]) if len(mom) else np.zeros(0)
        top1.append(iou[0] if len(iou) else 0.0)
        for n in ns:
            best = iou[:n].max() if len(iou) else 0.0
            for m in ious:
                hits[(n, m)].append(best > m if strict else best >= m - 1e-12)
    out = {f"R@{n},IoU={m}": 100 * float(np.mean(v)) for (n, m), v in sorted(hits.items())}
    out["mIoU"] = 100 * float(np.mean(top1))
    return out


def charades_chance_oracle(
    windows: Sequence[np.ndarray], gts: np.ndarray, ious: Sequence[float] = CHARADES_IOUS, strict: bool = False
) -> tuple[dict[str, float], dict[str, float]]:
    """Exact expectation for a uniformly random ranking of each query's windows, and the best window."""
    chance = {f"R@{n},IoU={m}": [] for n in (1, 5) for m in ious}
    oracle = {f"R@{n},IoU={m}": [] for n in (1, 5) for m in ious}
    ch_miou, or_miou = [], []
    for w, g in zip(windows, gts):
        iou = interval_iou(np.asarray(w), np.asarray(g)[None])
        W = len(iou)
        for m in ious:
            h = int(np.sum(iou > m if strict else iou >= m - 1e-12))
            for n in (1, 5):
                k = min(n, W)
                chance[f"R@{n},IoU={m}"].append(1 - math.comb(W - h, k) / math.comb(W, k))
                oracle[f"R@{n},IoU={m}"].append(float(h > 0))
        ch_miou.append(iou.mean())
        or_miou.append(iou.max())
    c = {k: 100 * float(np.mean(v)) for k, v in chance.items()}
    o = {k: 100 * float(np.mean(v)) for k, v in oracle.items()}
    c["mIoU"], o["mIoU"] = 100 * float(np.mean(ch_miou)), 100 * float(np.mean(or_miou))
    return c, o

"""Official metrics: DiDeMo (LocalizingMoments utils/eval.py) and Charades-STA R@n,IoU=m and mIoU.

Pure functions of rankings and annotations; the exact chance and oracle rows live here too.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
from collections import Counter
from typing import Sequence

import numpy as np

from ..data.records import DataError
from ..geometry import DIDEMO_CANDIDATES

Pair = tuple[int, int]


# ------------------------------------------------------------------------------------ DiDeMo
_CANDIDATE_SET = frozenset(DIDEMO_CANDIDATES)


def as_chunk_pair(m) -> Pair | None:
    """(s, e) if m is a pair of integers (bool excluded), else None."""
    if isinstance(m, np.ndarray):
        m = m.tolist()
    if not isinstance(m, (list, tuple)) or len(m) != 2:
        return None
    if not all(isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)) for x in m):
        return None
    return int(m[0]), int(m[1])


def didemo_ranking_problem(ranking) -> str | None:
    """Why `ranking` is not a permutation of the 21 DIDEMO_CANDIDATES (None when it is one).

    The official eval.py looks up every annotator pair in the ranking (and fails on a missing one),
    so it assumes all 21 candidates, each once: a truncated list would inflate R@1 (a random top-5
    list scores ~13 % R@1 against ~2 % for a random full ranking), an invalid or repeated pair is
    not a ranking of the candidates."""
    if isinstance(ranking, np.ndarray):
        ranking = ranking.tolist()
    if not isinstance(ranking, (list, tuple)):
        return f"moments must be a list of the 21 candidate pairs, got {type(ranking).__name__}"
    pairs, invalid = [], []
    for m in ranking:
        pr = as_chunk_pair(m)
        if pr is None or pr not in _CANDIDATE_SET:
            invalid.append(m)
        else:
            pairs.append(pr)
    problems = []
    if invalid:
        shown = ", ".join(repr(list(m)) if isinstance(m, tuple) else repr(m) for m in invalid[:3])
        problems.append(f"{len(invalid)} invalid pair(s) (e.g. {shown}; a candidate is [s, e] with integers "
                        f"0 <= s <= e <= 5)")
    dup = [p for p, c in Counter(pairs).items() if c > 1]
    if dup:
        problems.append(f"repeated pair(s) {', '.join(str(list(p)) for p in dup[:3])}")
    missing = [c for c in DIDEMO_CANDIDATES if c not in set(pairs)]
    if missing:
        problems.append(f"{len(missing)} of the 21 candidates missing (e.g. "
                        f"{', '.join(str(list(c)) for c in missing[:3])})")
    if not problems:
        return None
    return f"{len(ranking)} moments, not a permutation of the 21 candidates: " + "; ".join(problems)


def check_didemo_rankings(rankings: Sequence, ids: Sequence | None = None, where: dict | None = None,
                          id_name: str = "annotation_id") -> None:
    """Raise DataError naming a few offending queries unless every ranking is a permutation of the 21
    candidates.  `where` maps an id to its location (\"file: line N\")."""
    ids = list(ids) if ids is not None else list(range(len(rankings)))
    where = where or {}
    bad = [(i, why) for i, r in zip(ids, rankings) if (why := didemo_ranking_problem(r)) is not None]
    if bad:
        shown = "; ".join((f"{where[i]}: " if i in where else "") + f"{id_name} {i}: {why}" for i, why in bad[:3])
        shown += "; ..." if len(bad) > 3 else ""
        raise DataError(f"{len(bad)} of {len(rankings)} DiDeMo rankings are not a full ranking of the 21 candidates "
                        f"(the official eval.py needs every candidate, each once): {shown}")


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


def didemo_metrics(rankings: Sequence[Sequence[Pair]], times: Sequence[Sequence[Sequence[int]]],
                   check: bool = True) -> dict[str, float]:
    """R@1, R@5, mIoU in percent.  Every ranking must be a permutation of the 21 candidates (DataError
    otherwise; `check=False` skips the test for callers that already made it)."""
    if check:
        check_didemo_rankings(rankings, id_name="query index")
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
ACTIVITYNET_IOUS = (0.1, 0.3, 0.5)  # the thresholds weakly-supervised papers report on ActivityNet Captions
# Seconds a moment may pass 0 or the duration and still count as inside: checkpoints write moments rounded
# to 4 decimals, so a window ending exactly at the duration may read up to 5e-5 s past it.
MOMENT_TOLERANCE = 1e-4


def charades_moment_problem(moments, duration: float | None = None, clip: bool = False,
                            tol: float = MOMENT_TOLERANCE) -> tuple[str | None, np.ndarray | None]:
    """(problem, moments as a (K, 2) float array).  Refused: anything but a non-empty list of [start, end]
    real numbers, NaN/inf, end < start, start < 0 or end > duration (beyond `tol` seconds).  Zero-length
    moments (start == end) are valid.  With `clip`, moments are ordered start <= end and clipped into
    [0, duration] instead (NaN/inf and malformed input are still refused)."""
    if isinstance(moments, np.ndarray):
        moments = moments.tolist()
    if not isinstance(moments, (list, tuple)) or not moments:
        return "moments must be a non-empty list of [start, end] pairs", None
    for k, m in enumerate(moments):
        if not isinstance(m, (list, tuple)) or len(m) != 2:
            return f"moment {k + 1} is {m!r}, not a [start, end] pair", None
        if not all(isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)) for x in m):
            return f"moment {k + 1} is {list(m)!r}: start and end must be numbers (seconds)", None
    a = np.asarray(moments, dtype=np.float64).reshape(-1, 2)
    bad = ~np.isfinite(a).all(1)
    if bad.any():
        k = int(np.argmax(bad))
        return f"moment {k + 1} is {a[k].tolist()}: NaN/inf is not a time (refused even with clipping)", None
    if clip:
        a = np.sort(a, axis=1)
        hi = np.inf if duration is None else float(duration)
        return None, np.clip(a, 0.0, hi)
    rev = a[:, 1] < a[:, 0]
    if rev.any():
        k = int(np.argmax(rev))
        return (f"moment {k + 1} is {a[k].tolist()}: end < start ({int(rev.sum())} such moment(s); "
                f"--clip-predictions orders and clips them)"), None
    neg = a[:, 0] < -tol
    if neg.any():
        k = int(np.argmax(neg))
        return f"moment {k + 1} is {a[k].tolist()}: starts before 0 (--clip-predictions clips it)", None
    if duration is not None:
        over = a[:, 1] > float(duration) + tol
        if over.any():
            k = int(np.argmax(over))
            return (f"moment {k + 1} is {a[k].tolist()}: ends after the video's duration {float(duration):g} s "
                    f"({int(over.sum())} such moment(s); --clip-predictions clips them)"), None
    return None, a


def _hit(iou: np.ndarray | float, m: float, strict: bool, iou_tolerance: float):
    """IoU >= m (the official comparison), or > m with `strict`.  A tolerance t > 0 treats IoUs within t of m as
    equal to m: >= m - t, or > m + t with strict."""
    return iou > m + iou_tolerance if strict else iou >= m - iou_tolerance


def check_iou_tolerance(iou_tolerance: float) -> None:
    if not (isinstance(iou_tolerance, numbers.Real) and math.isfinite(iou_tolerance) and 0 <= iou_tolerance < 1):
        raise DataError(f"iou_tolerance (--iou-tolerance) must be a number in [0, 1), got {iou_tolerance!r}")


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
    ns: Sequence[int] = (1, 5), strict: bool = False, nms_thresh: float | None = None, iou_tolerance: float = 0.0,
) -> dict[str, float]:
    """R@n,IoU=m (hit if any of the top n has IoU >= m, plain comparison as in the official code; `strict`
    uses >; `iou_tolerance` > 0 loosens the comparison, see _hit) and mIoU (top-1), percent."""
    check_iou_tolerance(iou_tolerance)
    hits = {(n, m): [] for n in ns for m in ious}
    top1 = []
    for q, (mom, g) in enumerate(zip(moments, gts)):
        mom = np.asarray(mom, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(mom).all() or (mom[:, 1] < mom[:, 0]).any():
                    raise DataError(f"query index {q}: moments hold NaN/inf or end < start (scoring.score_charades "
                            f"refuses or clips them with a clear message)")
        if nms_thresh is not None:
            mom = nms(mom, nms_thresh)
        iou = interval_iou(mom, np.asarray(g)[None]) if len(mom) else np.zeros(0)
        top1.append(iou[0] if len(iou) else 0.0)
        for n in ns:
            best = iou[:n].max() if len(iou) else 0.0
            for m in ious:
                hits[(n, m)].append(bool(_hit(best, m, strict, iou_tolerance)))
    out = {f"R@{n},IoU={m}": 100 * float(np.mean(v)) for (n, m), v in sorted(hits.items())}
    out["mIoU"] = 100 * float(np.mean(top1))
    return out


def charades_chance_oracle(
    windows: Sequence[np.ndarray], gts: np.ndarray, ious: Sequence[float] = CHARADES_IOUS, strict: bool = False,
    iou_tolerance: float = 0.0,
) -> tuple[dict[str, float], dict[str, float]]:
    """Exact expectation for a uniformly random ranking of each query's windows, and the best window (same hit
    rule as charades_metrics)."""
    check_iou_tolerance(iou_tolerance)
    chance = {f"R@{n},IoU={m}": [] for n in (1, 5) for m in ious}
    oracle = {f"R@{n},IoU={m}": [] for n in (1, 5) for m in ious}
    ch_miou, or_miou = [], []
    for w, g in zip(windows, gts):
        iou = interval_iou(np.asarray(w), np.asarray(g)[None])
        W = len(iou)
        for m in ious:
            h = int(np.sum(_hit(iou, m, strict, iou_tolerance)))
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

"""Prior baselines: what the training annotations alone predict, scored on the evaluated queries.

A grounding number means little without the score of a method that never looks at the video: on real DiDeMo
ranking the 21 candidates by how often training annotators chose them scores R@1 ~19 (above the paper's WSRA
rows).  These rows are computed from the TRAINING annotations only (never the evaluated ones) and scored by the
same protocol functions as the run (metrics.didemo_metrics, metrics.charades_metrics):

* DiDeMo, moment frequency: the 21 candidates ranked by how many training annotator spans equal them (every
  annotator of every training query counts once); ties in DIDEMO_CANDIDATES order.  One ranking for every query.
* Charades-STA / ActivityNet, best fixed window: the single window (start/duration, end/duration) that maximises
  the training R@1 at the protocol's middle IoU (Charades-STA 0.5, ActivityNet 0.3), ties broken by the
  training mIoU, searched over a 0.01 grid of [0, 1] plus the protocol's inference windows; scaled to each
  evaluated query's duration.  One window, so R@5 is not reported (it would equal R@1).
* Charades-STA / ActivityNet, length/position: each query's inference windows (geometry.benchmark_windows)
  ranked by a Gaussian kernel density of the training moments' normalised (centre, length), bandwidth 0.05 of
  the video in both coordinates (fixed a priori, about Scott's rule for ~10^4 moments; not tuned on any evaluated
  split); ties in window order.  Diversified: a window overlapping an earlier pick by IoU >= 0.5 goes behind
  every window that does not (the windows overlap by 80 %; without this the top 5 are near-copies and R@5
  falls below chance).

Pure functions plus readers of the training annotations (official files or the run's training shards' meta.json).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.records import DataError
from ..geometry import DIDEMO_CANDIDATES, benchmark_windows
from . import metrics as M

PRIOR_FREQUENCY = "Prior: moment frequency (uses training timestamps; baseline)"
PRIOR_FIXED = "Prior: best fixed window (uses training timestamps; baseline)"
PRIOR_LENGTH = "Prior: length/position (uses training timestamps; baseline)"
PRIOR_LABELS = (PRIOR_FREQUENCY, PRIOR_FIXED, PRIOR_LENGTH)

GRID_STEP = 0.01  # fixed-window search grid (fraction of the video)
BANDWIDTH = 0.05  # length/position kernel bandwidth (fraction of the video), both coordinates
DIVERSIFY_IOU = 0.5  # length/position ranking: near-copies of an earlier window go to the back
# The protocol's middle threshold: the fixed window is chosen for it (Charades-STA 0.5, ActivityNet 0.3).
TARGET_IOU = {"charades": M.CHARADES_IOUS[1], "activitynet": M.ACTIVITYNET_IOUS[1]}
_IOUS = {"charades": M.CHARADES_IOUS, "activitynet": M.ACTIVITYNET_IOUS}


@dataclass
class TrainingSet:
    """Training annotations reduced to what the priors need: per query 'times' (DiDeMo: annotator chunk pairs;
    else one [start, end] in seconds) and 'duration' (seconds), plus where they were read."""
    protocol: str
    queries: list[dict]
    source: str

    def __len__(self) -> int:
        return len(self.queries)

    def check_apart(self, videos, where: str) -> None:
        """A prior is learnt from training timestamps: refuse training annotations that share videos with the
        evaluated split (e.g. its own file, or ActivityNet's val_1 against val_2: the same videos)."""
        shared = {q.get("video") for q in self.queries} & set(videos)
        shared.discard(None)
        if shared:
            raise DataError(f"{self.source}: the training annotations share {len(shared)} videos with {where} (e.g. "
                            f"{sorted(shared)[0]!r}); a prior learnt from them would use the evaluated timestamps")


# ----------------------------------------------------------------------------------------------- DiDeMo
def didemo_frequency_ranking(train_times: Sequence[Sequence[Sequence[int]]]) -> list[tuple[int, int]]:
    """The 21 candidates by how many training annotator spans equal them, most first; ties (and never-chosen
    candidates) in DIDEMO_CANDIDATES order, so the ranking is deterministic."""
    counts = Counter(tuple(int(x) for x in t) for times in train_times for t in times)
    return sorted(DIDEMO_CANDIDATES, key=lambda p: -counts.get(p, 0))  # sorted() is stable


# ------------------------------------------------------------------------------------- snippet benchmarks
def normalised_spans(queries: Sequence[dict]) -> np.ndarray:
    """(N, 2) [start, end] / duration of each query's first span, clipped into [0, 1]."""
    if not queries:
        return np.zeros((0, 2))
    a = np.asarray([q["times"][0] for q in queries], dtype=np.float64).reshape(-1, 2)
    d = np.asarray([float(q["duration"]) for q in queries], dtype=np.float64)
    if not (np.isfinite(d).all() and (d > 0).all()):
        raise DataError("training queries need a positive duration to normalise their moments")
    return np.clip(a / d[:, None], 0.0, 1.0)


def candidate_grid(protocol: str, step: float = GRID_STEP) -> np.ndarray:
    """(G, 2) normalised windows: every [i, j] * step with i < j on [0, 1], then the protocol's inference
    windows (benchmark_windows on a video of length 1), so the search can never do worse than the best of
    those."""
    n = int(round(1.0 / step))
    i, j = np.triu_indices(n + 1, k=1)
    grid = np.stack([i, j], 1) / n
    return np.concatenate([grid, benchmark_windows(protocol, 1.0)])


def fixed_window_scores(train: np.ndarray, windows: np.ndarray, target_iou: float, strict: bool = False,
                        iou_tolerance: float = 0.0, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(hits, IoU sums) over the training moments `train` (N, 2) of each window (G, 2), the hit rule of
    metrics.charades_metrics at `target_iou`.  Chunked over N: N x G IoUs would not fit for ActivityNet."""
    hits = np.zeros(len(windows), dtype=np.int64)
    sums = np.zeros(len(windows), dtype=np.float64)
    for k in range(0, len(train), chunk):
        iou = M.interval_iou(windows[None, :, :], train[k:k + chunk, None, :])  # (n, G)
        hits += M._hit(iou, target_iou, strict, iou_tolerance).sum(0)
        sums += iou.sum(0)
    return hits, sums


def best_fixed_window(train: np.ndarray, protocol: str, strict: bool = False, iou_tolerance: float = 0.0,
                      step: float = GRID_STEP) -> np.ndarray:
    """The normalised [start, end] maximising the training R@1 at TARGET_IOU[protocol], ties by the training
    mean IoU, then by grid order (np.lexsort is stable)."""
    if len(train) == 0:
        raise DataError("no training moments to choose a fixed window from")
    grid = candidate_grid(protocol, step)
    hits, sums = fixed_window_scores(train, grid, TARGET_IOU[protocol], strict, iou_tolerance)
    best = np.lexsort((-sums, -hits))[0]  # last key is primary
    return grid[best]


def window_density(windows: np.ndarray, train: np.ndarray, bandwidth: float = BANDWIDTH) -> np.ndarray:
    """Gaussian kernel density (unnormalised: ranks only) of the training moments' (centre, length) at each
    normalised window's (centre, length); (W,)."""
    def cl(x: np.ndarray) -> np.ndarray:
        return np.stack([(x[:, 0] + x[:, 1]) / 2, x[:, 1] - x[:, 0]], 1)

    w, t = cl(np.asarray(windows, dtype=np.float64)), cl(np.asarray(train, dtype=np.float64))
    d2 = ((w[:, None, :] - t[None, :, :]) ** 2).sum(-1)  # (W, N)
    return np.exp(-d2 / (2 * bandwidth ** 2)).sum(1)


def length_position_order(windows_norm: np.ndarray, train: np.ndarray, bandwidth: float = BANDWIDTH,
                          diversify: float = DIVERSIFY_IOU) -> np.ndarray:
    """Indices of the windows by training density, densest first (ties in window order), diversified: a window
    overlapping an earlier pick by IoU >= `diversify` moves behind every window that does not.  Without it the
    top 5 are near-copies of the densest window (the candidates overlap by 80 %) and R@5 falls below chance."""
    order = np.argsort(-window_density(windows_norm, train, bandwidth), kind="stable")
    w = np.asarray(windows_norm, dtype=np.float64)
    picked: list[int] = []
    later: list[int] = []
    for i in order:
        s, e = w[i]
        if any(max(0.0, min(e, w[j, 1]) - max(s, w[j, 0])) / (max(e, w[j, 1]) - min(s, w[j, 0])) >= diversify - 1e-9
               for j in picked):
            later.append(int(i))
        else:
            picked.append(int(i))
    return np.array(picked + later, dtype=np.int64)


def length_position_rankings(protocol: str, durations: Sequence[float], train: np.ndarray,
                             bandwidth: float = BANDWIDTH) -> list[np.ndarray]:
    """Each query's inference windows (seconds) ranked by the length/position prior.  The proportional windows
    are the same fractions of every video, so the density is computed once per distinct normalised window set."""
    cache: dict[tuple, np.ndarray] = {}
    out = []
    for dur in durations:
        wins = benchmark_windows(protocol, float(dur))
        norm = wins / float(dur)
        key = tuple(np.round(norm, 6).ravel())
        if key not in cache:
            cache[key] = length_position_order(norm, train, bandwidth)
        out.append(wins[cache[key]])
    return out


# --------------------------------------------------------------------------------------------- the rows
def prior_rows(protocol: str, train: TrainingSet, truth: Sequence[dict], strict: bool = False,
               nms: float | None = None, iou_tolerance: float = 0.0,
               fixed_window: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """{label: metrics} of the prior baselines of `protocol`, learnt on `train`, scored on `truth` (dicts with
    'times' and, for Charades-STA / ActivityNet, 'duration') with the run's hit rule and NMS.  The fixed window
    row has no R@5 keys (one window: R@5 would repeat R@1).  `fixed_window`: best_fixed_window's answer when
    the caller already has it (the search is the slow part on ActivityNet)."""
    if train.protocol != protocol:
        raise DataError(f"{train.source}: training annotations are {train.protocol}, not --protocol {protocol}")
    if len(train) == 0:
        raise DataError(f"{train.source}: no training queries to compute the prior baselines from")
    if protocol == "didemo":
        ranking = didemo_frequency_ranking([q["times"] for q in train.queries])
        times = [t["times"] for t in truth]
        return {PRIOR_FREQUENCY: M.didemo_metrics([ranking] * len(times), times, check=False)}
    spans = normalised_spans(train.queries)
    gts = np.asarray([t["times"][0] for t in truth], dtype=np.float64).reshape(-1, 2)
    durs = [float(t["duration"]) for t in truth]
    ious = _IOUS[protocol]
    s, e = fixed_window if fixed_window is not None else best_fixed_window(spans, protocol, strict, iou_tolerance)
    fixed = [np.array([[s * d, e * d]]) for d in durs]
    ranked = length_position_rankings(protocol, durs, spans)
    return {
        PRIOR_FIXED: M.charades_metrics(fixed, gts, ious=ious, ns=(1,), strict=strict, iou_tolerance=iou_tolerance),
        PRIOR_LENGTH: M.charades_metrics(ranked, gts, ious=ious, strict=strict, nms_thresh=nms,
                                         iou_tolerance=iou_tolerance),
    }


def describe(protocol: str, train: TrainingSet, strict: bool = False, iou_tolerance: float = 0.0,
             fixed_window: np.ndarray | None = None) -> dict:
    """What the prior rows were learnt from (for metrics.json): the source, its size and the chosen window."""
    out: dict = {"source": train.source, "num_train_queries": len(train)}
    if protocol == "didemo":
        out["ranking"] = [list(p) for p in didemo_frequency_ranking([q["times"] for q in train.queries])]
    else:
        w = (fixed_window if fixed_window is not None else
             best_fixed_window(normalised_spans(train.queries), protocol, strict, iou_tolerance))
        out |= {"fixed_window": [round(float(x), 4) for x in w], "fixed_window_target_iou": TARGET_IOU[protocol],
                "length_position_bandwidth": BANDWIDTH}
    return out


# ------------------------------------------------------------------------------------------ the readers
def training_from_annotations(protocol: str, path: str | Path, durations: str | Path | None = None,
                              rule: str = "clamp") -> TrainingSet:
    """The official training file of `protocol` (DiDeMo train_data.json; Charades-STA charades_sta_train.txt
    with its durations CSV, by default Charades_v1_train.csv beside it; ActivityNet train.json), read by the
    same readers and defect rule as the evaluated split."""
    from ..data import activitynet, charades, didemo

    path = Path(path)
    if protocol == "didemo":
        recs = didemo.read_annotations(path)
    elif protocol == "activitynet":
        recs, _ = activitynet.read_annotations(path, rule)
    elif protocol == "charades":
        dur = Path(durations) if durations else path.parent / "Charades_v1_train.csv"
        if not dur.is_file():
            raise DataError(f"{path}: Charades-STA training annotations need their durations: --train-durations "
                            f"Charades_v1_train.csv ({dur} not found)")
        recs, _ = charades.read_annotations(path, charades.read_durations(dur), rule, durations_file=str(dur))
    else:
        raise DataError(f"no prior baselines for protocol {protocol!r}")
    return TrainingSet(protocol, [{"times": r.times, "duration": r.duration, "video": r.video} for r in recs], str(path))


def training_from_shards(source: str, protocol: str, manifest: str = "", _followed: bool = False) -> TrainingSet:
    """The training queries' truth (times, duration) from shards' meta.json, features untouched; the shards
    must be of `protocol`'s benchmark."""
    from ..data.shards import load_manifest, manifest_path_for, read_metas, shard_urls

    m = load_manifest(manifest or manifest_path_for(source))
    if m.get("benchmark") != protocol:
        raise DataError(f"{source}: training shards are {m.get('benchmark')!r}, not --protocol {protocol}")
    pseudo = m.get("pseudo_labels")
    if isinstance(pseudo, dict):  # times written by a model (evaluation/pseudo_labels.py): the priors need the annotated ones
        if not pseudo.get("source_shards") or _followed:
            raise DataError(f"{source}: pseudo-labelled shards whose source is not annotated shards "
                            f"({pseudo.get('source_shards') or 'none named'}); give --train-annotations")
        return training_from_shards(str(pseudo["source_shards"]), protocol, _followed=True)
    queries = []
    for url in shard_urls(source, m):
        for meta in read_metas(url):
            for q in meta.get("queries", []):
                queries.append({"times": q["times"], "duration": meta.get("duration", q.get("duration")),
                                "video": meta.get("video")})
    return TrainingSet(protocol, queries, str(source))


def training_from_run(run_dir: str | Path, protocol: str) -> tuple[TrainingSet | None, str]:
    """(training set, '') from the run's recipe.yaml data.train_shards (relative paths from the current folder,
    as training read them), or (None, why) when it cannot be read: the table then says how to get the rows."""
    import yaml

    recipe = Path(run_dir) / "recipe.yaml"
    try:
        data = (yaml.safe_load(recipe.read_text()) or {}).get("data", {})
    except (OSError, yaml.YAMLError, AttributeError) as e:
        return None, f"no readable {recipe} ({type(e).__name__})"
    src = str(data.get("train_shards") or "")
    if not src:
        return None, f"{recipe} names no data.train_shards"
    from ..run_folder import recipe_path

    try:
        return training_from_shards(recipe_path(run_dir, src), protocol,
                                    recipe_path(run_dir, str(data.get("train_manifest") or ""))), ""
    except (ValueError, KeyError, TypeError) as e:  # DataError is a ValueError; a bad meta.json must not lose the run
        return None, f"the run's data.train_shards could not be read ({e})"


def omitted_note(protocol: str, why: str = "") -> str:
    """The caption's one-line note when the prior rows are left out."""
    how = {"didemo": "--train-annotations train_data.json",
           "charades": "--train-annotations charades_sta_train.txt --train-durations Charades_v1_train.csv",
           "activitynet": "--train-annotations train.json"}[protocol]
    return f"Prior baseline rows omitted{f' ({why})' if why else ''}: pass {how} to add them."


# ------------------------------------------------------------------------------------ for the evaluator
@dataclass
class Baselines:
    """The prior rows of one evaluation, what they were learnt from, and the caption's note."""
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    info: dict | None = None
    note: str = ""

    def json(self) -> dict:
        """metrics.json's block (new keys beside the contract's): rows rounded as the run's metrics."""
        out: dict = {"baselines": {k: {m: round(v, 4) for m, v in r.items()} for k, r in self.rows.items()},
                     "baselines_from": self.info}
        if not self.rows and self.note:
            out["baselines_omitted"] = self.note
        return out


def baselines_for(protocol: str, train: TrainingSet | None, why: str, truth: Sequence[dict], strict: bool = False,
                  nms: float | None = None, iou_tolerance: float = 0.0) -> Baselines:
    """The prior rows for `truth`, or none with a note saying why and how to get them."""
    if train is None:
        return Baselines(note=omitted_note(protocol, why))
    train.check_apart([t.get("video") for t in truth if isinstance(t, dict)], "the evaluated split")
    w = None
    if protocol != "didemo" and len(train) and train.protocol == protocol:
        w = best_fixed_window(normalised_spans(train.queries), protocol, strict, iou_tolerance)
    rows = prior_rows(protocol, train, truth, strict, nms, iou_tolerance, fixed_window=w)
    info = describe(protocol, train, strict, iou_tolerance, fixed_window=w)
    note = (f"Prior rows: baselines that never see the video, learnt on the {len(train)} training queries of "
            f"{train.source} (wsra_dist/evaluation/priors.py).")
    return Baselines(rows, info, note)

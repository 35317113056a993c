"""Chance, prior and oracle rows of a benchmark written in the official formats (the planted profiles)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The training files of each benchmark's folder (the prior rows are learnt on them): (annotations, durations).
TRAIN_FILES = {"didemo": ("train_data.json", None), "charades": ("charades_sta_train.txt", "Charades_v1_train.csv"),
               "activitynet": ("train.json", None)}


def test_split_file(out: Path, profile: str) -> str:
    """The file of the split the reference rows are computed on: DiDeMo test, Charades-STA test, ActivityNet
    val_2 (val_1 when a realistic folder was written without val_2)."""
    if profile.startswith("didemo"):
        return "test_data.json"
    if profile.startswith("activitynet"):
        return "val_2.json" if (Path(out) / "val_2.json").is_file() or not (Path(out) / "val_1.json").is_file() else "val_1.json"
    return "charades_sta_test.txt"


def benchmark_reference_rows(out: Path, profile: str) -> dict[str, dict[str, float]]:
    """Chance (exact expectation), the prior baselines learnt on the folder's training file (when it is there;
    priors.py) and oracle rows of the written test split, through the official readers."""
    from .. import geometry as C
    from ..data import activitynet, charades, didemo
    from . import metrics as M
    from .priors import prior_rows, training_from_annotations

    out = Path(out)
    # Realistic profiles (didemo-real, ...) write the same files as their benchmark.
    bench = next((b for b in TRAIN_FILES if profile == b or profile.startswith(b + "-")), "charades")

    def priors(truth: list[dict]) -> dict[str, dict[str, float]]:
        ann, dur = TRAIN_FILES[bench]
        if not (out / ann).is_file():
            return {}
        train = training_from_annotations(bench, out / ann, out / dur if dur else None)
        return prior_rows(bench, train, truth)

    if bench == "didemo":
        recs = didemo.read_annotations(out / "test_data.json")
        times = [r.times for r in recs]
        oracle = M.didemo_metrics([M.didemo_oracle_ranking(t) for t in times], times)
        return {"Chance": M.didemo_chance(times), **priors([{"times": t} for t in times]), "Upper bound": oracle}
    if bench == "activitynet":
        recs, _ = activitynet.read_annotations(out / test_split_file(out, profile), "clamp")
        ch, orc = M.charades_chance_oracle([C.benchmark_windows("activitynet", r.duration) for r in recs],
                                           np.array([r.times[0] for r in recs]), ious=M.ACTIVITYNET_IOUS)
        return {"Chance": ch, **priors([{"times": r.times, "duration": r.duration} for r in recs]), "Upper bound": orc}
    dur = charades.read_durations(out / "Charades_v1_test.csv")
    recs, _ = charades.read_annotations(out / "charades_sta_test.txt", dur, "clamp")
    ch, orc = M.charades_chance_oracle([C.proportional_windows(r.duration) for r in recs],
                                       np.array([r.times[0] for r in recs]))
    return {"Chance": ch, **priors([{"times": r.times, "duration": r.duration} for r in recs]), "Upper bound": orc}

"""Chance and oracle rows of a benchmark written in the official formats (the planted profiles)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def benchmark_reference_rows(out: Path, profile: str) -> dict[str, dict[str, float]]:
    """Chance (exact expectation) and oracle rows of the written test split, through the official readers."""
    from .. import geometry as C
    from ..data import activitynet, charades, didemo
    from . import metrics as M

    if profile == "didemo":
        recs = didemo.read_annotations(out / "test_data.json")
        times = [r.times for r in recs]
        oracle = M.didemo_metrics([M.didemo_oracle_ranking(t) for t in times], times)
        return {"Chance": M.didemo_chance(times), "Upper bound": oracle}
    if profile == "activitynet":  # the test split is val_2
        recs, _ = activitynet.read_annotations(out / "val_2.json", "clamp")
        ch, orc = M.charades_chance_oracle([C.benchmark_windows("activitynet", r.duration) for r in recs],
                                           np.array([r.times[0] for r in recs]), ious=M.ACTIVITYNET_IOUS)
        return {"Chance": ch, "Upper bound": orc}
    dur = charades.read_durations(out / "Charades_v1_test.csv")
    recs, _ = charades.read_annotations(out / "charades_sta_test.txt", dur, "clamp")
    ch, orc = M.charades_chance_oracle([C.proportional_windows(r.duration) for r in recs],
                                       np.array([r.times[0] for r in recs]))
    return {"Chance": ch, "Upper bound": orc}

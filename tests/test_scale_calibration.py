"""model.scale_calibration (wsra_dist/scale_calibration.py, evaluation/calibration.py): the tensor functions
against a slow loop-by-loop reference, the window sizes against the benchmark windows, and the statistics a
checkpoint gets (computed from its training shards, stored as JSON beside the weights, used by evaluate)."""

import json
import math
import random

import numpy as np
import pytest
import torch

from wsra_dist import scale_calibration as SC
from wsra_dist.geometry import BENCHMARK_WINDOWS, DIDEMO_CANDIDATES, benchmark_windows


def _reference_stats(rows):
    """rows: [(logits list, groups list)] -> {g: (mean, population sd)}, plain Python."""
    vals: dict[int, list[float]] = {}
    for lg, gs in rows:
        for x, g in zip(lg, gs):
            if math.isfinite(x):
                vals.setdefault(g, []).append(x)
    out = {}
    for g, xs in vals.items():
        m = sum(xs) / len(xs)
        out[g] = (m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs)))
    return out


def test_accumulate_finish_standardise_match_the_reference():
    rnd = random.Random(3)
    rows = []
    acc = SC.empty_stats(4)
    for _ in range(7):  # batches of different windows and sizes
        W = rnd.randint(1, 9)
        gs = [rnd.randrange(4) for _ in range(W)]
        lg = [rnd.gauss(2.0 * g, 1.0 + g) for g in gs]
        if W > 2:
            lg[1] = float("-inf")  # padding (DiDeMo past the video's end) is left out
        rows.append((lg, gs))
        acc = SC.accumulate(acc, torch.tensor(lg, dtype=torch.float64), torch.tensor(gs))
    mu, sd = SC.finish(acc)
    ref = _reference_stats(rows)
    for g in range(4):
        if g in ref:
            assert mu[g].item() == pytest.approx(ref[g][0], abs=1e-9)
            assert sd[g].item() == pytest.approx(max(ref[g][1], 1e-6), abs=1e-9)
        else:  # never seen: passes unchanged
            assert (mu[g].item(), sd[g].item()) == (0.0, 1.0)
    lg, gs = rows[0]
    z = SC.standardise(torch.tensor(lg, dtype=torch.float64), torch.tensor(gs), mu, sd)
    for x, g, zz in zip(lg, gs, z.tolist()):
        if math.isfinite(x):
            assert zz == pytest.approx((x - mu[g].item()) / sd[g].item(), abs=1e-12)
        else:
            assert zz == float("-inf")


def test_mask_batches_and_none_mode():
    lg = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    g = torch.tensor([0, 1, 1])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    mu, sd = SC.finish(SC.accumulate(SC.empty_stats(2), lg, g, mask))
    ref = _reference_stats([([1.0, 2.0], [0, 1]), ([4.0, 5.0, 6.0], [0, 1, 1])])
    assert mu.tolist() == pytest.approx([ref[0][0], ref[1][0]]) and sd.tolist() == pytest.approx([ref[0][1], ref[1][1]])
    assert SC.calibrate("none", lg, g, None) is lg
    with pytest.raises(ValueError, match="needs the training statistics"):
        SC.calibrate("standardise", lg, g, None)
    with pytest.raises(ValueError, match="out of range"):
        SC.accumulate(SC.empty_stats(1), lg, g)
    with pytest.raises(ValueError, match="must be one of"):
        SC.check_mode("zscore")


def test_standardising_equalises_the_sizes_and_keeps_the_order_within_one():
    # Size 0 scores high on average (small windows), size 1 low: after standardising each size has mean 0, sd 1,
    # and within a size the order is unchanged.
    torch.manual_seed(0)
    g = torch.tensor([0] * 5 + [1] * 3)
    lg = torch.randn(40, 8, dtype=torch.float64) + torch.where(g == 0, 3.0, -1.0) * torch.ones(8, dtype=torch.float64)
    mu, sd = SC.finish(SC.accumulate(SC.empty_stats(2), lg, g))
    z = SC.standardise(lg, g, mu, sd)
    for k in (0, 1):
        assert z[:, g == k].mean().item() == pytest.approx(0.0, abs=1e-9)
        assert z[:, g == k].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-9)
    assert torch.equal(lg[:, :5].argsort(-1), z[:, :5].argsort(-1))


@pytest.mark.parametrize("benchmark", ["charades", "activitynet"])
def test_window_groups_follow_the_benchmark_windows(benchmark):
    fractions, _ = BENCHMARK_WINDOWS[benchmark]
    for dur in (7.3, 30.0, 131.9):
        wins = benchmark_windows(benchmark, dur)
        g = SC.window_groups(benchmark, dur)
        assert len(g) == len(wins) and SC.n_groups(benchmark) == len(fractions)
        lengths = wins[:, 1] - wins[:, 0]
        for k, f in enumerate(fractions):  # each window's size is its fraction of the video
            assert np.allclose(lengths[g.numpy() == k], f * dur)
    assert SC.window_groups("didemo", 30.0).tolist() == [e - s for s, e in DIDEMO_CANDIDATES]
    assert SC.n_groups("didemo") == 6


def test_json_round_trip_and_refusals():
    mu, sd = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([2.0, 0.25], dtype=torch.float64)
    d = json.loads(json.dumps(SC.stats_to_json(mu, sd, torch.tensor([3.0, 4.0]), queries=7)))
    back = SC.stats_from_json(d)
    assert torch.equal(back["mu"], mu) and torch.equal(back["sd"], sd) and back["count"] == [3, 4]
    with pytest.raises(ValueError, match="format"):
        SC.stats_from_json({**d, "format": "other/1"})
    with pytest.raises(ValueError, match="positive sd"):
        SC.stats_from_json({**d, "sd": [1.0, 0.0]})


def test_checkpoint_statistics_are_the_training_scores_and_are_stored(trained_didemo, tmp_path):
    """The statistics of a trained DiDeMo checkpoint equal the per-size mean/sd of its ranking logits over every
    training query against its own video's candidates (a direct loop), are written as JSON beside the weights
    and read back, and evaluate ranks by the standardised logits."""
    import shutil

    from wsra_dist.data.loader import ShardSource, iter_eval_batches
    from wsra_dist.evaluation.calibration import CALIBRATION_FILE, attach
    from wsra_dist.evaluation.predict import load_run, rank_batch
    from wsra_dist.evaluation.runner import evaluate_checkpoints

    run = tmp_path / "run"
    shutil.copytree(trained_didemo / "run", run, ignore=shutil.ignore_patterns(CALIBRATION_FILE))
    model, _ = load_run(run)
    assert model.scale_calibration == "none" and model.scale_stats is None
    src = ShardSource.open(str(trained_didemo / "shards" / "train"))
    rows = []
    for b in iter_eval_batches(src, 64):
        lg = model.candidate_logits(b.video, b.text).double().masked_fill(~b.mask, float("-inf"))
        rows += [(r.tolist(), [e - s for s, e in DIDEMO_CANDIDATES]) for r in lg]
    ref = _reference_stats(rows)

    attach(model, run, mode="standardise", train_shards=str(trained_didemo / "shards" / "train"))
    assert model.scale_stats["queries"] == len(rows)
    for g in range(6):
        assert model.scale_stats["mu"][g].item() == pytest.approx(ref[g][0], abs=1e-6)
        assert model.scale_stats["sd"][g].item() == pytest.approx(ref[g][1], rel=1e-6)
    stored = json.loads((run / CALIBRATION_FILE).read_text())  # JSON, keyed by the weights
    assert stored["format"].startswith("wsra-dist-scale-calibration/") and len(stored["weights_sha256"]) == 64

    again, _ = load_run(run)  # the checkpoint's own setting is none; asking for it reads the stored file
    attach(again, run, mode="standardise")
    assert torch.equal(again.scale_stats["mu"], model.scale_stats["mu"])

    b = next(iter(iter_eval_batches(ShardSource.open(str(trained_didemo / "shards" / "test")), 8)))
    preds = rank_batch(model, b, "didemo", torch.device("cpu"))
    lg = model.candidate_logits(b.video, b.text).double().masked_fill(~b.mask, float("-inf"))
    z = SC.standardise(lg, torch.tensor(SC.DIDEMO_GROUPS), model.scale_stats["mu"], model.scale_stats["sd"])
    for p, zz in zip(preds, z):
        assert p["moments"][0] == list(DIDEMO_CANDIDATES[int(zz.argmax())])
    metrics, _ = evaluate_checkpoints([str(run)], [str(trained_didemo / "shards" / "test")], "didemo",
                                      tmp_path / "ev", scale_calibration="standardise")
    settings = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert "R@1" in metrics and "standardise" in json.dumps(settings)


def test_inside_outside_matches_a_loop():
    rnd = random.Random(5)
    T = 11
    x = [rnd.gauss(0, 2) for _ in range(T)]
    ranges = [(0, 11), (0, 3), (4, 5), (2, 10), (10, 11)]
    for lam in (0.0, 1.0, 16.0):
        got = SC.inside_outside(torch.tensor(x), torch.tensor(ranges), lam).tolist()
        for (a, b), g in zip(ranges, got):
            inside = sum(x[a:b]) / (b - a)
            rest = x[:a] + x[b:]
            out = sum(rest) / len(rest) if rest else sum(x) / T  # the whole video: its own mean
            assert g == pytest.approx(inside - lam * out, abs=1e-5)


def test_recipe_keys_are_checked():
    from pathlib import Path

    from wsra_dist.config import ConfigError, load_recipe

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "charades_best.yaml"
    r = load_recipe(recipe, ["model.scale_calibration=standardise", "model.contrast_weight=2"])
    assert (r.model.scale_calibration, r.model.contrast_weight) == ("standardise", 2.0)
    assert load_recipe(recipe.with_name("charades_i3d.yaml"), []).model.scale_calibration == "none"
    with pytest.raises(ConfigError, match="model.scale_calibration"):
        load_recipe(recipe, ["model.scale_calibration=zscore"])
    with pytest.raises(ConfigError, match="model.contrast_weight"):
        load_recipe(recipe, ["model.contrast_weight=-1"])


def test_evaluate_refuses_unknown_calibration_before_loading(tmp_path):
    from wsra_dist.data.records import DataError
    from wsra_dist.evaluation.runner import evaluate_checkpoints

    with pytest.raises(DataError, match="--scale-calibration must be one of"):
        evaluate_checkpoints([str(tmp_path / "no_run")], [str(tmp_path / "no_shards")], "charades", tmp_path / "o",
                             scale_calibration="zscore")
    with pytest.raises(DataError, match="--contrast-weight"):
        evaluate_checkpoints([str(tmp_path / "no_run")], [str(tmp_path / "no_shards")], "charades", tmp_path / "o",
                             contrast_weight=-1.0)

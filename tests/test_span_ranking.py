"""model.scale_calibration span: the best span and the window masses against brute force, and the ranking that
evaluate, ground and the corpus apply (tiny random models, no training)."""

import itertools

import numpy as np
import pytest
import torch

from wsra_dist.scale_calibration import best_span, span_values


def _brute_best(x):
    best = max(x[a:b].sum() for a, b in itertools.combinations(range(len(x) + 1), 2))
    return best, [(a, b) for a, b in itertools.combinations(range(len(x) + 1), 2) if np.isclose(x[a:b].sum(), best)]


@pytest.mark.parametrize("seed", range(12))
def test_best_span_is_the_maximum_mass_contiguous_range(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(int(rng.integers(1, 30))) + rng.choice([-1.0, 0.0, 0.5])
    a, b = best_span(torch.from_numpy(x))
    best, spans = _brute_best(x)
    assert 0 <= a < b <= len(x) and (a, b) in spans and np.isclose(x[a:b].sum(), best)


def test_best_span_of_all_negative_values_is_the_largest_single_value():
    assert best_span(torch.tensor([-3.0, -1.0, -2.0])) == (1, 2)
    assert best_span(torch.tensor([2.0])) == (0, 1)


def test_span_values_are_masses_of_standardised_logits_and_the_span_ranks_first():
    rng = np.random.default_rng(0)
    s = rng.standard_normal(40)
    s[12:25] += 1.5
    ranges = torch.tensor([[0, 10], [5, 15], [10, 20], [20, 30], [30, 40], [0, 40]])
    vals, span = span_values(torch.from_numpy(s), ranges, -0.3)
    z = (s - s.mean()) / s.std() + 0.3
    want = [z[a:b].sum() / 40 for a, b in ranges.tolist()]
    assert np.allclose(vals[1:].numpy(), want, atol=1e-12)
    a, b = (int(v) for v in span.tolist())
    assert span.tolist() == [a, b]  # no band: whole snippets
    assert np.isclose(vals[0].item(), z[a:b].sum() / 40) and vals[0] == vals.max()
    assert _brute_best(z)[0] == pytest.approx(z[a:b].sum())
    assert 10 <= a <= 14 and 23 <= b <= 27  # the planted stretch


def test_a_window_on_the_spans_snippets_is_not_a_second_candidate():
    """The span stays (first); the window that covers the same snippets goes, whatever its seconds."""
    s = torch.zeros(20, dtype=torch.float64)
    s[5:10] = 3.0
    ranges = torch.tensor([[0, 10], [5, 10], [10, 20]])
    vals, span = span_values(s, ranges, 0.0)
    assert span.tolist() == [5, 10] and vals[2] == float("-inf") and torch.isfinite(vals[[0, 1, 3]]).all()
    assert vals.argmax() == 0


def test_the_span_keeps_its_own_seconds_when_a_window_rounds_onto_its_snippets():
    """A window whose edges fall inside the span's edge snippets maps to the same snippets: the span's seconds
    (snippet edges) are the first moment, the window is left out (no tie decided by list order)."""
    from wsra_dist.evaluation.predict import with_span
    from wsra_dist.geometry import window_snippet_range

    T, dur = 13, 13.42
    s = torch.full((T,), -1.0, dtype=torch.float64)
    s[0:6] = 2.0
    wins = np.array([[0.0, 5.368], [5.368, 10.736], [0.0, 13.42]])
    ranges = torch.tensor([window_snippet_range(a, b, dur, T) for a, b in wins])
    assert ranges[0].tolist() == [0, 6]  # the window rounds outward onto the span's snippets
    vals, w, g = with_span(s, ranges, wins, torch.tensor([0, 0, 1]), dur, 0.0)
    assert np.allclose(w[0], [0.0, 6 * dur / T]) and g[0] == -1
    assert len(w) == 3 and not any(np.allclose(x, wins[0]) for x in w)


@pytest.mark.parametrize("seed", range(6))
def test_a_band_averages_the_best_spans_edges_over_nine_thresholds(seed):
    """band w: the span's edges are the means of the brute-force best spans' edges at θ + o, o evenly spread
    over [-w, w] (9 values); it still ranks first, and the windows keep their masses at θ."""
    rng = np.random.default_rng(seed)
    T = int(rng.integers(8, 24))
    s = rng.standard_normal(T)
    s[T // 4: T // 2] += 1.5
    ranges = torch.tensor([[0, T // 2], [T // 4, T], [0, T]])
    theta, w = float(rng.choice([-0.4, -0.3, 0.0])), float(rng.choice([0.3, 0.8]))
    vals, span = span_values(torch.from_numpy(s), ranges, theta, w)
    z = (s - s.mean()) / s.std() - theta
    edges = []
    for o in np.linspace(-w, w, 9):
        best, found = _brute_best(z - o)
        edges.append(found[-1] if len(found) > 1 else found[0])
        assert np.isclose((z - o)[edges[-1][0]:edges[-1][1]].sum(), best)
    # ties between equal-mass ranges are measure-zero for random logits: one range per threshold
    assert np.allclose(span.numpy(), np.mean(edges, 0), atol=1e-12)
    cells = [int(round(v)) for v in span.tolist()]
    want = [z[a:b].sum() / T if [a, b] != cells else -np.inf for a, b in ranges.tolist()]
    assert np.allclose(vals[1:].numpy(), want, atol=1e-12)
    assert vals[0] == vals.max() and np.argsort(-vals.numpy(), kind="stable")[0] == 0


def test_a_band_of_zero_is_the_single_threshold():
    s = torch.from_numpy(np.random.default_rng(3).standard_normal(30))
    ranges = torch.tensor([[0, 10], [10, 30]])
    v0, s0 = span_values(s, ranges, -0.3)
    v1, s1 = span_values(s, ranges, -0.3, 0.0)
    assert torch.equal(v0, v1) and torch.equal(s0, s1)


def test_evaluate_ranking_with_a_band_puts_the_averaged_span_first():
    from wsra_dist.data.batch import Batch
    from wsra_dist.evaluation.predict import rank_batch
    from wsra_dist.scale_calibration import band_span

    model = _charades_model("span")
    model.scale_calibration, model.scale_stats, model.span_threshold, model.span_band = "span", None, -0.3, 0.8
    T, dur = 30, 24.0
    video = torch.randn(1, T, 8)
    meta = [{"query_id": 0, "video": "v0", "duration": dur}]
    batch = Batch(video, torch.ones(1, T, dtype=torch.bool), torch.randn(1, 4), torch.arange(1), torch.zeros(1, T), meta)
    r = rank_batch(model, batch, "charades", torch.device("cpu"))[0]
    sl = model.scorer.pair_logits(video[0], batch.text[0]).double().detach()
    a, b = band_span((sl - sl.mean()) / sl.std(unbiased=False) + 0.3, 0.8).tolist()
    assert r["moments"][0] == [round(a * dur / T, 4), round(b * dur / T, 4)]
    assert r["scores"] == sorted(r["scores"], reverse=True)


def test_constant_logits_do_not_divide_by_zero():
    vals, span = span_values(torch.full((8,), 0.7), torch.tensor([[0, 4], [0, 8]]), -0.3)
    assert torch.isfinite(vals[:2]).all() and span.tolist() == [0, 8]  # θ < 0: every snippet adds 0.3


def _charades_model(mode):
    from wsra_dist.model import WSRA

    info = {"benchmark": "charades", "dims": {"video": 8, "text": 4}, "layout": None,
            "model": {"hidden": 5, "depth": 1, "dropout": 0.0, "input_norm": "none", "scale_calibration": mode,
                      "span_threshold": -0.3}}
    torch.manual_seed(0)
    return WSRA.from_info(info).eval()


def test_evaluate_ranking_puts_each_querys_span_first_with_seconds_of_its_snippets():
    from wsra_dist.data.batch import Batch
    from wsra_dist.evaluation.predict import rank_batch

    model = _charades_model("span")
    model.scale_calibration, model.scale_stats, model.span_threshold = "span", None, -0.3
    T, dur = 30, 24.0
    video = torch.randn(2, T, 8)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, 20:] = False  # the second video has 20 snippets
    meta = [{"query_id": i, "video": f"v{i}", "duration": dur} for i in range(2)]
    batch = Batch(video, mask, torch.randn(2, 4), torch.arange(2), torch.zeros(2, T), meta)
    out = rank_batch(model, batch, "charades", torch.device("cpu"))
    for i, r in enumerate(out):
        n = int(mask[i].sum())
        sl = model.scorer.pair_logits(video[i, :n], batch.text[i])
        z = ((sl - sl.mean()) / sl.std(unbiased=False)).double().detach().numpy() + 0.3
        a, b = best_span(torch.from_numpy(z))
        assert r["moments"][0] == [round(a * dur / n, 4), round(b * dur / n, 4)]
        assert r["scores"] == sorted(r["scores"], reverse=True)
        assert len({tuple(m) for m in r["moments"]}) == len(r["moments"])  # no window twice


def test_the_corpus_sets_span_aside_as_it_sets_contrast_aside():
    from wsra_dist.corpus.candidates import corpus_ranking

    model = _charades_model("span")
    model.scale_calibration = "span"
    assert corpus_ranking(model) == "span" and model.scale_calibration == "none"


def test_recipe_keys_are_checked(tmp_path):
    from wsra_dist.config import ConfigError, load_recipe

    r = tmp_path / "r.yaml"
    r.write_text("name: x\n")
    got = load_recipe(r, ["model.scale_calibration=span", "model.span_threshold=-0.5"])
    assert (got.model.scale_calibration, got.model.span_threshold) == ("span", -0.5)
    with pytest.raises(ConfigError, match="model.span_threshold"):
        load_recipe(r, ["model.span_threshold=.nan"])
    assert load_recipe(r, []).model.span_band == 0.0  # default: θ alone (the ranking before the band)
    assert load_recipe(r, ["model.span_band=0.8"]).model.span_band == 0.8
    for bad in ("-0.1", ".inf", ".nan"):
        with pytest.raises(ConfigError, match="model.span_band"):
            load_recipe(r, [f"model.span_band={bad}"])


class _Encoder:
    dim = 4

    def encode(self, queries):
        rng = np.random.default_rng(len(queries))
        return rng.standard_normal((len(queries), 4)).astype(np.float32)


def test_ground_ranks_like_evaluate_under_span():
    """`wsra-dist ground` and evaluate give a query the same first moments: its best span, then the windows."""
    from wsra_dist.evaluation.predict import with_span
    from wsra_dist.geometry import benchmark_windows, window_snippet_range
    from wsra_dist.ground import Grounder
    from wsra_dist.scale_calibration import window_groups

    model = _charades_model("span")
    model.scale_calibration, model.scale_stats, model.span_threshold = "span", None, -0.3
    info = {**model.info, "reader": {}}
    g = Grounder(model, info, torch.device("cpu"), _encoder=_Encoder())
    feats = np.random.default_rng(1).standard_normal((25, 8)).astype(np.float32)
    res = g.ground(feats, ["a", "b", "c"], duration=20.0, top_k=4)
    text = torch.from_numpy(_Encoder().encode(["a", "b", "c"]))
    wins = benchmark_windows("charades", 20.0)
    ranges = torch.tensor([window_snippet_range(a, b, 20.0, 25) for a, b in wins])
    for r, t in zip(res, text):
        sl = model.scorer.pair_logits(torch.from_numpy(feats), t).detach()
        v, w, _ = with_span(sl, ranges, wins, window_groups("charades", 20.0), 20.0, -0.3)
        order = np.argsort(-v.numpy(), kind="stable")[:4]
        assert r["moments"] == [[round(float(w[i, 0]), 3), round(float(w[i, 1]), 3)] for i in order]
        assert len(r["candidate_moments"]) == len(r["candidate_scores"]) == len(w)


def test_evaluate_checks_the_span_threshold_before_loading(tmp_path):
    from wsra_dist.data.records import DataError
    from wsra_dist.evaluation.runner import evaluate_checkpoints

    with pytest.raises(DataError, match="--span-threshold must be a finite number"):
        evaluate_checkpoints([str(tmp_path / "no_run")], [str(tmp_path / "no_shards")], "charades", tmp_path / "o",
                             span_threshold=float("inf"))


def test_evaluate_refuses_span_parameters_that_cannot_apply_before_loading(tmp_path):
    """Refused from the options alone (nothing loaded, no statistics computed, no folder written)."""
    from wsra_dist.data.records import DataError
    from wsra_dist.evaluation.runner import evaluate_checkpoints

    nowhere = ([str(tmp_path / "no_run")], [str(tmp_path / "no_shards")])
    with pytest.raises(DataError, match="--span-threshold is a parameter of the span ranking, which ranks windows"):
        evaluate_checkpoints(*nowhere, "didemo", tmp_path / "o", span_threshold=0.0)
    with pytest.raises(DataError, match="--scale-calibration span ranks windows over snippets"):
        evaluate_checkpoints(*nowhere, "didemo", tmp_path / "o", scale_calibration="span")
    with pytest.raises(DataError, match="--span-threshold is a parameter of the span ranking, not of "
                                        "--scale-calibration standardise"):
        evaluate_checkpoints(*nowhere, "activitynet", tmp_path / "o", scale_calibration="standardise",
                             span_threshold=0.0)
    with pytest.raises(DataError, match="--contrast-weight is a parameter of the contrast ranking, not of "
                                        "--scale-calibration span"):
        evaluate_checkpoints(*nowhere, "charades", tmp_path / "o", scale_calibration="span", contrast_weight=1.0)
    with pytest.raises(DataError, match="--span-band is a parameter of the span ranking, which ranks windows"):
        evaluate_checkpoints(*nowhere, "didemo", tmp_path / "o", span_band=0.5)
    with pytest.raises(DataError, match="--span-band is a parameter of the span ranking, not of "
                                        "--scale-calibration contrast"):
        evaluate_checkpoints(*nowhere, "activitynet", tmp_path / "o", scale_calibration="contrast", span_band=0.5)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(DataError, match="--span-band must be a finite number >= 0"):
            evaluate_checkpoints(*nowhere, "activitynet", tmp_path / "o", span_band=bad)
    assert not (tmp_path / "o").exists()


def test_training_refuses_a_within_video_ranking_on_didemo_chunks(planted_didemo, tmp_path):
    """A DiDeMo checkpoint with span (or contrast) could never be evaluated: refused before training."""
    from pathlib import Path

    from wsra_dist.config import ConfigError, load_recipe
    from wsra_dist.train import train

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "planted_didemo.yaml"
    for mode in ("span", "contrast"):
        r = load_recipe(recipe, [f"data.train_shards={planted_didemo / 'shards' / 'train'}", "data.val_shards=",
                                 "data.test_shards=", f"output_dir={tmp_path / mode}", f"model.scale_calibration={mode}"])
        with pytest.raises(ConfigError, match=f"model.scale_calibration {mode} ranks windows over snippets"):
            train(r)
        assert not (tmp_path / mode).exists() or not any((tmp_path / mode).iterdir())  # nothing written


def test_prediction_files_refuse_every_reranking_option(tmp_path):
    from typer.testing import CliRunner

    from wsra_dist.cli import app

    for flag, value in (("--scale-calibration", "span"), ("--span-threshold", "0"), ("--contrast-weight", "1"),
                        ("--span-band", "0.5")):
        res = CliRunner().invoke(app, ["evaluate", "--predictions", str(tmp_path / "p.jsonl"), "--annotations",
                                       str(tmp_path / "a.json"), "--protocol", "charades", "--out",
                                       str(tmp_path / "o"), flag, value])
        assert res.exit_code != 0 and f"{flag} re-ranks a checkpoint's candidates" in str(res.exception), res.output

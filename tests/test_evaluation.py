"""Metrics on hand-checked cases, exact chance vs Monte Carlo, prediction files, distributed evaluation."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsra_dist.data import charades, didemo
from wsra_dist.data.records import DataError
from wsra_dist.evaluation import metrics as M
from wsra_dist.geometry import DIDEMO_CANDIDATES, proportional_windows
from wsra_dist.evaluation.scoring import score_charades, score_didemo

from .helpers import SHARED, requires_shared

ROOT = Path(__file__).resolve().parents[1]


def ranking(first, *rest):
    """A full 21-candidate ranking starting with the given pairs (rest in candidate order)."""
    head = [first, *rest]
    return head + [c for c in DIDEMO_CANDIDATES if c not in head]


# ------------------------------------------------------------------------------ DiDeMo
@pytest.mark.parametrize("p, g, iou", [((0, 0), (0, 0), 1.0), ((0, 1), (1, 1), 0.5), ((0, 0), (2, 3), 0.0),
                                       ((1, 3), (2, 5), 2 / 5), ((5, 5), (0, 5), 1 / 6)])
def test_didemo_iou_inclusive(p, g, iou):
    assert M.didemo_iou(p, g) == pytest.approx(iou)


def test_didemo_query_hand_cases():
    # 3 annotators agree on (1,1), one says (0,0): top-1 (1,1) -> ranks [1,1,1] -> R@1; IoU mean(1,1,1).
    assert M.didemo_query(ranking((1, 1), (0, 0)), [[1, 1], [1, 1], [1, 1], [0, 0]]) == (1.0, 1.0)
    # Duplicates count separately: only 2 annotators say (1,1) -> 3 smallest ranks [1,1,2] -> mean 4/3, not R@1.
    r, iou = M.didemo_query(ranking((1, 1), (0, 0)), [[1, 1], [1, 1], [0, 0], [2, 2]])
    assert r == pytest.approx(4 / 3) and iou == pytest.approx((1 + 1 + 0) / 3)
    # R@5 boundary: ranks 4, 5, 6 -> mean 5 counts for R@5.
    rk = ranking((0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5))
    r, _ = M.didemo_query(rk, [[3, 3], [4, 4], [5, 5], [5, 5]])
    assert r == pytest.approx(5.0)
    m = M.didemo_metrics([rk], [[[3, 3], [4, 4], [5, 5], [5, 5]]])
    assert (m["R@1"], m["R@5"]) == (0.0, 100.0)
    # 7 annotators: the 3 best of 7 ranks and the 3 best of 7 IoUs.
    times = [[2, 3]] * 2 + [[2, 2]] + [[0, 0]] * 4
    r, iou = M.didemo_query(ranking((2, 3), (2, 2)), times)
    assert r == pytest.approx((1 + 1 + 2) / 3) and iou == pytest.approx((1 + 1 + 0.5) / 3)
    # A 5-chunk video: num_segments is ignored, a pair touching chunk 5 is ranked as any other.
    assert M.didemo_query(ranking((4, 5)), [[4, 5]] * 4) == (1.0, 1.0)


def test_didemo_order_is_never_assumed():
    preds = [{"annotation_id": 7, "moments": [list(c) for c in reversed(DIDEMO_CANDIDATES)]}]
    m = score_didemo(preds, [{"query_id": 7, "times": [[4, 5]] * 4}])
    assert m["R@1"] == 100.0  # (4, 5) is the last candidate in the reference order but first here


@requires_shared
def test_didemo_chance_and_upper_bound_on_real_test():
    recs = didemo.read_annotations(SHARED / "didemo" / "test_data.json")
    times = [r.times for r in recs]
    ch = M.didemo_chance(times)
    assert (round(ch["R@1"], 2), round(ch["R@5"], 1), round(ch["mIoU"], 2)) == (3.56, 22.4, 22.63)
    ub = M.didemo_metrics([M.didemo_oracle_ranking(t) for t in times], times)
    assert (round(ub["R@1"], 2), ub["R@5"], round(ub["mIoU"], 2)) == (74.76, 100.0, 96.05)


@requires_shared
def test_didemo_chance_exact_agrees_with_monte_carlo():
    recs = didemo.read_annotations(SHARED / "didemo" / "val_data.json")[:400]
    times = [r.times for r in recs]
    exact = M.didemo_chance(times)
    rng = random.Random(0)
    draws = [M.didemo_metrics([rng.sample(DIDEMO_CANDIDATES, 21) for _ in times], times) for _ in range(60)]
    for k in ("R@1", "R@5", "mIoU"):
        v = np.array([d[k] for d in draws])
        assert abs(v.mean() - exact[k]) < 4 * v.std() / np.sqrt(len(v)) + 0.05, (k, v.mean(), exact[k])


# ------------------------------------------------------------------------------ Charades-STA
def test_interval_iou_cases():
    assert M.interval_iou([0, 10], [5, 15]) == pytest.approx(5 / 15)
    assert M.interval_iou([3, 3], [0, 10]) == 0.0  # zero-length prediction
    assert M.interval_iou([2, 2], [2, 2]) == 0.0  # zero-length both: union 0 -> 0
    assert M.interval_iou([25, 40], [20, 30]) == pytest.approx(5 / 20)  # past the end: plain arithmetic
    assert M.interval_iou([0, 5], [6, 9]) == 0.0


def test_charades_metrics_strict_nms_and_topn():
    gt = np.array([[0.0, 10.0]])
    preds = [np.array([[0, 5.0], [0, 5.01], [0, 5.02], [0, 5.03], [0, 5.04], [0, 10.0]])]
    m = M.charades_metrics(preds, gt)
    assert m["R@1,IoU=0.5"] == 100.0 and m["R@1,IoU=0.7"] == 0.0 and m["R@5,IoU=0.7"] == 0.0
    assert M.charades_metrics(preds, gt, strict=True)["R@1,IoU=0.5"] == 0.0  # IoU exactly 0.5 is not > 0.5
    m = M.charades_metrics(preds, gt, nms_thresh=0.5)  # near-duplicates removed: [0, 10] enters the top 5
    assert m["R@5,IoU=0.7"] == 100.0 and m["mIoU"] == pytest.approx(50.0)


@requires_shared
def test_charades_chance_and_oracle_on_real_test():
    dur = charades.read_durations(SHARED / "charades-sta" / "Charades_v1_test.csv")
    recs, _ = charades.read_annotations(SHARED / "charades-sta" / "charades_sta_test.txt", dur, "clamp")
    ch, orc = M.charades_chance_oracle([proportional_windows(r.duration) for r in recs],
                                       np.array([r.times[0] for r in recs]))
    assert [round(ch[f"R@1,IoU={m}"], 1) for m in (0.3, 0.5, 0.7)] == [31.2, 16.6, 5.7]
    assert [round(orc[f"R@1,IoU={m}"], 2) for m in (0.3, 0.5, 0.7)] == [99.87, 98.63, 93.33]
    # Monte Carlo of the evaluator with uniformly random window rankings agrees with the exact chance.
    rng = np.random.default_rng(0)
    sub = recs[:600]
    wins = [proportional_windows(r.duration) for r in sub]
    exact, _ = M.charades_chance_oracle(wins, np.array([r.times[0] for r in sub]))
    draws = [M.charades_metrics([w[rng.permutation(len(w))] for w in wins], np.array([r.times[0] for r in sub]))
             for _ in range(40)]
    for k in ("R@1,IoU=0.5", "R@5,IoU=0.5", "mIoU"):
        v = np.array([d[k] for d in draws])
        assert abs(v.mean() - exact[k]) < 4 * v.std() / np.sqrt(len(v)) + 0.05, (k, v.mean(), exact[k])


# ------------------------------------------------------------------------------ prediction files
from tests.helpers import run_cli as _cli  # noqa: E402


@requires_shared
def test_evaluate_didemo_prediction_file(tmp_path):
    ann = SHARED / "didemo" / "val_data.json"
    recs = didemo.read_annotations(ann)
    with (tmp_path / "p.jsonl").open("w") as f:
        for r in recs:
            f.write(json.dumps({"annotation_id": r.query_id,
                                "moments": [list(c) for c in M.didemo_oracle_ranking(r.times)]}) + "\n")
    p = _cli("evaluate", "--predictions", tmp_path / "p.jsonl", "--annotations", ann, "--protocol", "didemo",
             "--out", tmp_path / "res")
    m = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert set(m) >= {"R@1", "R@5", "mIoU"} and m["R@5"] == 100.0 and m["R@1"] > 70
    assert (tmp_path / "res" / "table.md").is_file() and (tmp_path / "res" / "table.csv").is_file()
    assert "WSRA (paper)" in p.stdout and "TGA" in p.stdout
    # Missing, extra and duplicate ids are errors that list a few.
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    bad = lines[1:] + [lines[2], json.dumps({"annotation_id": 999999, "moments": [list(c) for c in DIDEMO_CANDIDATES]})]
    (tmp_path / "bad.jsonl").write_text("\n".join(bad) + "\n")
    p = _cli("evaluate", "--predictions", tmp_path / "bad.jsonl", "--annotations", ann, "--protocol", "didemo",
             "--out", tmp_path / "res2", check=False)
    err = p.stdout + p.stderr
    assert p.returncode != 0 and "have no prediction" in err and "name no annotated query" in err and "more than once" in err
    assert str(recs[0].query_id) in err and "999999" in err


@requires_shared
def test_evaluate_charades_prediction_file(tmp_path):
    ann, dur = SHARED / "charades-sta" / "charades_sta_test.txt", SHARED / "charades-sta" / "Charades_v1_test.csv"
    recs, _ = charades.read_annotations(ann, charades.read_durations(dur), "strict")
    with (tmp_path / "p.jsonl").open("w") as f:
        for r in recs:  # a perfect top-1, then the whole video
            f.write(json.dumps({"query_id": r.query_id, "video": r.video,
                                "moments": [r.times[0], [0.0, r.duration]]}) + "\n")
    _cli("evaluate", "--predictions", tmp_path / "p.jsonl", "--annotations", ann, "--durations", dur,
         "--protocol", "charades", "--charades-filter", "strict", "--out", tmp_path / "res")
    m = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert m["R@1,IoU=0.7"] == 100.0 and m["num_queries"] == 3158
    assert set(m) >= {"R@1,IoU=0.3", "R@1,IoU=0.5", "R@1,IoU=0.7", "R@5,IoU=0.3", "R@5,IoU=0.5", "R@5,IoU=0.7", "mIoU"}
    assert "strict rule" in (tmp_path / "res" / "table.md").read_text()
    with pytest.raises(DataError, match="have no prediction"):
        score_charades([], [{"query_id": 0, "times": [[0, 1]]}])


# ------------------------------------------------------------------------------ from a checkpoint
def test_evaluate_checkpoint_and_two_process_evaluation(trained_didemo, tmp_path):
    run, shards = trained_didemo / "run", trained_didemo / "shards" / "test"
    _cli("evaluate", "--checkpoint", run, "--shards", shards, "--protocol", "didemo", "--out", tmp_path / "one")
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    preds = [json.loads(l) for l in (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()]
    n = didemo.read_annotations(trained_didemo / "data" / "test_data.json")
    assert len(preds) == len(n) and all(len(p["moments"]) == 21 for p in preds)
    assert one["R@1"] > 3 * M.didemo_chance([r.times for r in n])["R@1"]
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "-m", "wsra_dist.evaluate", "--checkpoint", str(run), "--shards", str(shards),
                        "--protocol", "didemo", "--out", str(tmp_path / "two")], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert {k: two[k] for k in ("R@1", "R@5", "mIoU")} == {k: one[k] for k in ("R@1", "R@5", "mIoU")}
    assert (tmp_path / "two" / "predictions.jsonl").read_text() == (tmp_path / "one" / "predictions.jsonl").read_text()


def test_late_fusion_of_two_checkpoints(trained_didemo, tmp_path):
    run, shards = trained_didemo / "run", trained_didemo / "shards" / "test"
    _cli("evaluate", "--checkpoint", run, "--shards", shards, "--checkpoint", run, "--shards", shards,
         "--fusion-weights", "0.3,0.7", "--protocol", "didemo", "--out", tmp_path / "fused")
    _cli("evaluate", "--checkpoint", run, "--shards", shards, "--protocol", "didemo", "--out", tmp_path / "one")
    a = json.loads((tmp_path / "fused" / "metrics.json").read_text())
    b = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert a["R@1"] == b["R@1"] and a["settings"]["fusion_weights"] == [0.3, 0.7]


# ------------------------------------------------------------------------------ chunk consistency (DiDeMo ranking)
def test_chunk_min_against_a_loop_and_rank_logits():
    import torch

    from wsra_dist.geometry import DIDEMO_CANDIDATES, didemo_chunk_min
    from wsra_dist.model import WSRA, DidemoLayout, ScorerConfig

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 21, generator=g, dtype=torch.float64)
    got = didemo_chunk_min(logits)
    for idx in np.ndindex(5, 3):
        for c, (s, e) in enumerate(DIDEMO_CANDIDATES):
            assert got[idx][c] == min(float(logits[idx][k]) for k in range(s, e + 1))  # (k, k) sits at position k
    assert torch.equal(got[..., :6], logits[..., :6])  # a single chunk is its own weakest chunk
    cfg = ScorerConfig(video_dim=8, text_dim=4, hidden=3, depth=1, input_norm="none")
    model = WSRA(cfg, didemo=DidemoLayout((4,)), chunk_consistency=0.7)
    assert torch.allclose(model.rank_logits(logits), (logits + 0.7 * got) / 1.7)  # same order as logit + μ·min
    assert torch.allclose(model.rank_logits(logits)[..., :6], logits[..., :6])  # single chunks keep their own logit
    model.chunk_consistency = 1e300  # any finite μ: the weakest chunk decides, nothing overflows
    assert torch.allclose(model.rank_logits(logits), got)
    model.chunk_consistency = 0.0
    assert torch.equal(model.rank_logits(logits), logits)
    snippets = WSRA(cfg, chunk_consistency=0.7)  # no DiDeMo layout: windows are ranked by φ alone
    assert torch.equal(snippets.rank_logits(logits), logits)


def test_evaluate_chunk_consistency_reranks_and_is_recorded(trained_didemo, tmp_path):
    run, shards = trained_didemo / "run", trained_didemo / "shards" / "test"
    _cli("evaluate", "--checkpoint", run, "--shards", shards, "--protocol", "didemo", "--out", tmp_path / "plain")
    _cli("evaluate", "--checkpoint", run, "--shards", shards, "--protocol", "didemo", "--out", tmp_path / "cc",
         "--chunk-consistency", "1")
    plain = [json.loads(l) for l in (tmp_path / "plain" / "predictions.jsonl").read_text().splitlines()]
    cc = [json.loads(l) for l in (tmp_path / "cc" / "predictions.jsonl").read_text().splitlines()]
    m = json.loads((tmp_path / "cc" / "metrics.json").read_text())
    assert m["settings"]["chunk_consistency"] == [1.0]
    # the report's figures rank as evaluate did (their candidate map says so)
    assert "ranking score (chunk consistency μ 1)" in (tmp_path / "cc" / "report.html").read_text()
    assert "ranking score" not in (tmp_path / "plain" / "report.html").read_text()
    assert json.loads((tmp_path / "plain" / "metrics.json").read_text())["settings"]["chunk_consistency"] == [0.0]
    # the φ scores of the plain ranking, re-ranked by the rule by hand, give the same top-1 for every query
    import torch

    from wsra_dist.geometry import DIDEMO_CANDIDATES, didemo_chunk_min

    changed = 0
    for p, q in zip(plain, cc):
        s = dict(zip(map(tuple, p["moments"]), p["scores"]))
        valid = [c for c in DIDEMO_CANDIDATES if np.isfinite(s[c])]  # chunks past the video are ranked last
        lg = torch.tensor([float(torch.logit(torch.tensor(s[c], dtype=torch.float64))) if np.isfinite(s[c]) else 0.0
                           for c in DIDEMO_CANDIDATES], dtype=torch.float64)
        want = lg + didemo_chunk_min(lg)
        best = max(float(want[DIDEMO_CANDIDATES.index(c)]) for c in valid)
        top = tuple(q["moments"][0])
        assert top in valid and float(want[DIDEMO_CANDIDATES.index(top)]) >= best - 1e-4, (p["annotation_id"], top)
        changed += top != tuple(p["moments"][0])
    assert changed > 0  # the rule does re-rank


@pytest.mark.parametrize("args, message", [
    (["--chunk-consistency", "-1"], "finite number >= 0"),
    (["--chunk-consistency", "nan"], "finite number >= 0"),
])
def test_evaluate_chunk_consistency_refusals(trained_didemo, tmp_path, args, message):
    run, shards = trained_didemo / "run", trained_didemo / "shards" / "test"
    p = subprocess.run([sys.executable, "-m", "wsra_dist.cli", "evaluate", "--checkpoint", str(run), "--shards",
                        str(shards), "--protocol", "didemo", "--out", str(tmp_path / "x"), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and message in p.stdout + p.stderr, p.stdout[-2000:] + p.stderr[-2000:]
    assert not (tmp_path / "x").exists()


def test_chunk_consistency_refused_where_it_means_nothing(tmp_path):
    from wsra_dist.config import ConfigError, load_recipe
    from wsra_dist.evaluation.runner import evaluate_checkpoints

    with pytest.raises(DataError, match="ranks DiDeMo's chunk candidates"):
        evaluate_checkpoints(["run"], ["shards"], "charades", tmp_path / "x", chunk_consistency=1.0)
    p = subprocess.run([sys.executable, "-m", "wsra_dist.cli", "evaluate", "--predictions", "p.jsonl", "--annotations",
                        "a.json", "--protocol", "didemo", "--out", str(tmp_path / "y"), "--chunk-consistency", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "already ranked" in p.stdout + p.stderr
    with pytest.raises(ConfigError, match="model.chunk_consistency"):
        load_recipe(ROOT / "recipes" / "didemo_best.yaml", ["model.chunk_consistency=-0.5"])
    from wsra_dist.model import WSRA

    info = {"dims": {"video": 8, "text": 4}, "layout": {"kind": "didemo_chunks", "modalities": [4]},
            "model": {"hidden": 3, "depth": 1, "dropout": 0.0, "input_norm": "none"}}
    for bad in (-1.0, float("nan"), float("inf"), "abc", True):  # a hand-edited wsra_model.json
        with pytest.raises(ValueError, match="model.chunk_consistency must be a finite number >= 0"):
            WSRA.from_info({**info, "model": {**info["model"], "chunk_consistency": bad}})
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_ranking_follows_logits_where_float32_sigmoid_saturates():
    """Two confident candidates (logits 20 and 25) both have float32 φ = 1: the ranking must still put 25 first."""
    from types import SimpleNamespace

    import torch

    from wsra_dist.evaluation.predict import rank_batch

    lg = torch.full((1, 21), -3.0)
    lg[0, 0], lg[0, 7] = 20.0, 25.0  # candidate (0, 0) comes first in candidate order, (0, 2) is the better one
    assert torch.sigmoid(lg[0, 0]) == torch.sigmoid(lg[0, 7]) == 1.0
    mask = torch.ones(1, 21, dtype=torch.bool)
    mask[0, 20] = False  # a candidate past the video's end is ranked last
    model = SimpleNamespace(candidate_logits=lambda video, text: lg)
    batch = SimpleNamespace(video=torch.zeros(1, 6, 4), mask=mask, text=torch.zeros(1, 3), meta=[{"query_id": 7}])
    (p,) = rank_batch(model, batch, "didemo", torch.device("cpu"))
    assert p["moments"][0] == list(DIDEMO_CANDIDATES[7]) and p["moments"][1] == list(DIDEMO_CANDIDATES[0])
    assert p["scores"][0] > p["scores"][1]  # float64 sigmoid keeps them apart
    assert p["moments"][-1] == list(DIDEMO_CANDIDATES[20]) and p["scores"][-1] == float("-inf")

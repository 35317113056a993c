"""Grounding free text with a planted-trained checkpoint, the --json contract and the plot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from wsra_dist.data.synthetic import heldout_sentence
from wsra_dist.geometry import DIDEMO_CANDIDATES
from wsra_dist.evaluation.metrics import didemo_iou
from wsra_dist.ground import load_model

ROOT = Path(__file__).resolve().parents[1]


def test_ground_heldout_paraphrases_well_above_chance(trained_didemo):
    truth = json.loads((trained_didemo / "data" / "planted_truth.json").read_text())["videos"]
    test_videos = {r["video"] for r in json.loads((trained_didemo / "data" / "test_data.json").read_text())}
    g = load_model(trained_didemo / "run", "cpu")
    hits, chance = [], []
    with h5py.File(trained_didemo / "data" / "average_global_flow.h5", "r") as f:
        for vid in sorted(test_videos):
            events = [e for e in truth[vid] if not e.get("distractor")]
            queries = [heldout_sentence(tuple(e["event"]), seed=i) for i, e in enumerate(events)]
            res = g.ground(f[vid][()], queries, top_k=21)
            for e, r in zip(events, res):
                s, e_ = e["span"]
                m0, m1 = r["moments"][0]
                top = (round(m0 / 5), round(m1 / 5) - 1)  # seconds back to the inclusive chunk pair
                assert top in DIDEMO_CANDIDATES
                hits.append(didemo_iou(top, (s, e_)) >= 0.5)
                chance.append(np.mean([didemo_iou(c, (s, e_)) >= 0.5 for c in DIDEMO_CANDIDATES]))
    assert "swings open" not in (trained_didemo / "data" / "train_data.json").read_text()  # truly held out
    assert np.mean(hits) > 2 * np.mean(chance) and np.mean(hits) > 0.4, (np.mean(hits), np.mean(chance))


def test_ground_cli_json_and_plot(trained_didemo, tmp_path):
    truth = json.loads((trained_didemo / "data" / "planted_truth.json").read_text())["videos"]
    vid = next(v for v in truth if v.endswith(".mov"))
    ev = truth[vid][0]
    q1, q2 = heldout_sentence(tuple(ev["event"])), "a person waves at the camera."
    (tmp_path / "qs.txt").write_text(q2 + "\n")
    feats = f"{trained_didemo / 'data' / 'average_global_flow.h5'}:{vid}"
    p = subprocess.run([sys.executable, "-m", "wsra_dist.cli", "ground", "--checkpoint", str(trained_didemo / "run"),
                        "--features", feats, "--query", q1, "--queries", str(tmp_path / "qs.txt"), "--top-k", "3",
                        "--json", "--plot", str(tmp_path / "a.png"),
                        "--truth", f"{5 * ev['span'][0]},{5 * (ev['span'][1] + 1)}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert [r["query"] for r in out["results"]] == [q1, q2]
    for r in out["results"]:
        assert {"query", "moments", "scores", "pred_relevant_windows"} <= set(r) and len(r["moments"]) == 3
        assert r["pred_relevant_windows"] == [[s, e, sc] for (s, e), sc in zip(r["moments"], r["scores"])]
        assert r["scores"] == sorted(r["scores"], reverse=True)
    png = (tmp_path / "a.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_ground_rejects_mismatched_features(trained_didemo):
    g = load_model(trained_didemo / "run", "cpu")
    with pytest.raises(ValueError, match=r"\(6, \d+\) chunk features"):
        g.ground(np.zeros((9, 1024), dtype=np.float32), ["x"])
    with pytest.raises(ValueError, match=r"takes \(6, 1024\) chunk features .* got \(6, 512\)"):
        g.ground(np.zeros((6, 512), dtype=np.float32), ["x"])


def test_ground_rejects_other_text_model(trained_didemo):
    g = load_model(trained_didemo / "run", "cpu")
    g.info = {**g.info, "dims": {**g.info["dims"], "text": 768}}
    with pytest.raises(ValueError, match="gives 384-d features but the checkpoint expects 768-d"):
        _ = g.encoder
    g = load_model(trained_didemo / "run", "cpu")
    g.info = {**g.info, "text": {**g.info["text"], "identity": "0000000000000000"}}
    with pytest.raises(ValueError, match="differs from the one the checkpoint was trained with"):
        _ = g.encoder


def test_ground_ranks_like_evaluate_with_chunk_consistency(trained_didemo):
    import torch

    from wsra_dist.geometry import didemo_chunk_min

    g = load_model(trained_didemo / "run", "cpu")
    with h5py.File(trained_didemo / "data" / "average_global_flow.h5", "r") as f:
        feats = f[sorted(f.keys())[0]][()]
    queries = ["a person opens the door", "the dog runs away"]
    plain = g.ground(feats, queries, top_k=21)
    g.model.chunk_consistency = 1.0
    cc = g.ground(feats, queries, top_k=21)
    for p, q in zip(plain, cc):
        assert p["phi"] == q["phi"]  # φ itself is unchanged; only the ranking rule differs
        lg = torch.logit(torch.tensor(p["candidate_scores"], dtype=torch.float64))
        want = torch.sigmoid((lg + didemo_chunk_min(lg)) / 2)
        assert np.allclose(q["candidate_scores"], want.numpy(), atol=1e-5)
        assert q["scores"] == sorted(q["scores"], reverse=True)
        assert np.isclose(q["scores"][0], float(want.max()), atol=1e-5)

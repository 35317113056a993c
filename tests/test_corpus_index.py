"""The search index's storage: DiDeMo's per-video parts rebuild the candidates, --features indexes, damage is refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from wsra_dist.data.records import DataError


@pytest.mark.parametrize("norm,dims,tef", [("none", (8,), False), ("l2", (8,), True), ("l2", (5, 7), True),
                                           ("none", (5, 7), False)])
def test_chunk_store_rebuilds_the_models_candidate_projections(norm, dims, tef):
    from wsra_dist.corpus.store import DidemoChunkStore
    from wsra_dist.geometry import didemo_candidates_from_chunks, didemo_input_dim
    from wsra_dist.model import DidemoLayout, ScorerConfig, WSRA

    torch.manual_seed(0)
    cfg = ScorerConfig(video_dim=didemo_input_dim(dims, tef), text_dim=4, hidden=6, depth=1, input_norm=norm)
    model = WSRA(cfg, didemo=DidemoLayout(dims, tef)).double()
    chunks = torch.randn(5, 6, sum(dims), dtype=torch.float64)
    chunks[1, 4:] = 0  # a 5-chunk video and an empty chunk: the norms' ε path
    # the reference: materialised candidate vectors through φ's first layer
    want = model.scorer.project_video(didemo_candidates_from_chunks(chunks, dims, tef))
    parts = model.scorer.didemo_parts(chunks, dims, tef)
    store = DidemoChunkStore.from_parts(parts, model.scorer.proj_v.bias)
    got = store.flat().double()
    assert torch.allclose(got, want.reshape(-1, 6).float().double(), atol=1e-5)
    # the stored rows: 1 global + 6 per modality, against 21 candidates
    assert store.g.shape == (5, 6) and store.local.shape == (len(dims), 6, 5, 6)
    blocks = list(store.blocks(2 * 21))  # two videos a block: (21, 2, H), candidate c of video v at [c, v]
    assert [s for s, _ in blocks] == [0, 42, 84] and blocks[0][1].shape == (21, 2, 6)
    assert torch.allclose(blocks[1][1][:, 1].double(), want[3].float().double(), atol=1e-5)


@pytest.fixture(scope="module")
def index_pair(trained_didemo, tmp_path_factory):
    from wsra_dist.corpus.index import build_index

    out = tmp_path_factory.mktemp("idx")
    run = trained_didemo / "run"
    build_index(run, [str(trained_didemo / "shards" / "test")], out / "shards", "fp32")
    build_index(run, [], out / "features", "fp32", features=[str(trained_didemo / "data" / "average_global_flow.h5")])
    return trained_didemo, out


def test_features_index_equals_the_shards_index(index_pair):
    from wsra_dist.corpus.index import CorpusIndex

    root, out = index_pair
    a, b = CorpusIndex.load(out / "shards"), CorpusIndex.load(out / "features")
    assert set(a.corpus.videos) < set(b.corpus.videos)  # the .h5 holds every split's videos
    pa = a.corpus.store.flat().view(len(a.corpus.videos), 21, -1)
    pb = b.corpus.store.flat().view(len(b.corpus.videos), 21, -1)
    where = {v: i for i, v in enumerate(b.corpus.videos)}
    idx = torch.tensor([where[v] for v in a.corpus.videos])
    assert torch.allclose(pa, pb[idx], atol=1e-5)
    feats = b.manifest["features"][0]
    assert feats["source"].endswith("average_global_flow.h5") and len(feats["features_sha256"]) == 64
    # the DiDeMo layout stores 7 rows of H per video (+ 42 fp32 scalars), not 21 candidates
    H = b.manifest["hidden"]
    per_video = b.nbytes / len(b.corpus.videos)
    assert per_video < 1.1 * 12 * H * 4 and per_video < 0.4 * 21 * H * 4


def test_damaged_index_is_refused(index_pair, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from wsra_dist.corpus.index import CorpusIndex, file_sha256

    _, out = index_pair
    for case in ("flip", "truncate", "nan"):
        d = tmp_path / case
        shutil.copytree(out / "shards", d)
        f = d / "candidates.safetensors"
        if case == "flip":
            raw = bytearray(f.read_bytes())
            raw[-100] ^= 0xFF
            f.write_bytes(bytes(raw))
            want = "sha256 differs"
        elif case == "truncate":
            f.write_bytes(f.read_bytes()[:1000])
            m = json.loads((d / "index.json").read_text())
            m.pop("sha256")  # an index without a checksum (format /1) that was cut short
            (d / "index.json").write_text(json.dumps(m))
            want = "incomplete or damaged"
        else:  # NaN written by something that also updated the checksum
            t = load_file(str(f))
            t["local"][0, 0, 0, 0] = float("nan")
            save_file(t, str(f))
            m = json.loads((d / "index.json").read_text())
            m["sha256"] = file_sha256(f)
            (d / "index.json").write_text(json.dumps(m))
            want = "NaN or infinite"
        with pytest.raises(DataError, match=want):
            CorpusIndex.load(d)


def test_index_out_is_checked_before_projecting(trained_didemo, tmp_path):
    from wsra_dist.corpus.index import build_index

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not an index"):
        build_index(trained_didemo / "run", [str(tmp_path / "no-such-shards")], tmp_path / "busy", "fp16")
    assert (tmp_path / "busy" / "x.txt").read_text() == "mine"
    with pytest.raises(DataError, match="give the videos to index"):
        build_index(trained_didemo / "run", [], tmp_path / "new", "fp16")
    with pytest.raises(DataError, match="no such file or folder"):
        build_index(trained_didemo / "run", [], tmp_path / "new", "fp16", features=[str(tmp_path / "nope.h5")])


def test_window_features_index_matches_direct_projection(tmp_path):
    """Charades-STA layout: a folder of VIDEO.npy, time axis from --fps, windows of the protocol."""
    from wsra_dist.corpus.features_source import read_features_corpus
    from wsra_dist.geometry import benchmark_windows, window_snippet_range
    from wsra_dist.model import WSRA

    info = {"benchmark": "charades", "dims": {"video": 8, "text": 4}, "layout": None,
            "model": {"hidden": 5, "depth": 1, "dropout": 0.0, "input_norm": "l2"}}
    model = WSRA.from_info(info).eval()
    rng = np.random.default_rng(0)
    lengths = {"AAA01": 31, "BBB02": 12}
    for name, T in lengths.items():
        np.save(tmp_path / f"{name}.npy", rng.standard_normal((T, 8)).astype(np.float32))
    with pytest.raises(DataError, match="--fps"):
        read_features_corpus(model, info, str(tmp_path), "cpu")
    c = read_features_corpus(model, info, str(tmp_path), "cpu", fps=2.0)
    assert c.videos == ["AAA01", "BBB02"] and c.durations == [15.5, 6.0]
    pv = c.store.flat()
    for i, (name, T) in enumerate(lengths.items()):
        x = torch.as_tensor(np.load(tmp_path / f"{name}.npy"))
        wins = benchmark_windows("charades", T / 2.0)
        ranges = torch.tensor([window_snippet_range(a, b, T / 2.0, T) for a, b in wins])
        want = model.scorer.project_windows(x, ranges)
        assert torch.allclose(pv[c.video_of == i], want, atol=1e-6)
        assert np.allclose(c.starts[c.video_of == i], np.asarray(wins)[:, 0])
    np.save(tmp_path / "CCC03.npy", rng.standard_normal((5, 9)).astype(np.float32))
    with pytest.raises(DataError, match="CCC03.npy: 9-d features"):
        read_features_corpus(model, info, str(tmp_path), "cpu", fps=2.0)


def test_python_api_load_index(index_pair):
    from wsra_dist.corpus import load_index
    from wsra_dist.corpus.index import CorpusIndex
    from wsra_dist.corpus.search import Searcher

    _, out = index_pair
    s = load_index(out / "features", device="cpu")
    got = s.search("a person opens a door", top_k=5)
    want = Searcher(CorpusIndex.load(out / "features"), encoder=s.encoder, device="cpu").search("a person opens a door", top_k=5)
    assert [m.json() for m in got] == [m.json() for m in want] and len(got) == 5
    # the logit the order follows comes with each moment (the sigmoid saturates; the logit does not)
    lg = [m.logit for m in got]
    assert lg == sorted(lg, reverse=True) and all(abs(1 / (1 + math.exp(-x)) - m.score) < 1e-12 for x, m in zip(lg, got))


def _window_model(mode: str):
    from wsra_dist.model import WSRA

    info = {"benchmark": "charades", "dims": {"video": 8, "text": 4}, "layout": None,
            "model": {"hidden": 5, "depth": 1, "dropout": 0.0, "input_norm": "none"}}
    model = WSRA.from_info(info).eval()
    model.scale_calibration, model.scale_stats, model.contrast_weight = mode, None, 3.0
    return model, info


def test_contrast_models_rank_the_corpus_as_evaluate_ranks_a_video(tmp_path):
    """model.scale_calibration contrast: the index keeps snippets; every window's value is inside_outside."""
    from wsra_dist.corpus.features_source import read_features_corpus
    from wsra_dist.corpus.index import CorpusIndex, write_index
    from wsra_dist.corpus.search import corpus_logits
    from wsra_dist.geometry import benchmark_windows, window_snippet_range
    from wsra_dist.scale_calibration import inside_outside

    model, info = _window_model("contrast")
    rng = np.random.default_rng(1)
    lengths = {"A": 31, "B": 9, "C": 20}
    for name, T in lengths.items():
        np.save(tmp_path / f"{name}.npy", rng.standard_normal((T, 8)).astype(np.float32))
    c = read_features_corpus(model, info, str(tmp_path), "cpu", fps=1.0)
    assert c.store.layout == "snippets" and c.store.pv.shape[0] == sum(lengths.values())
    pt = model.scorer.project_text(torch.randn(2, 4))
    got = corpus_logits(model, c, pt, "charades")
    want = []
    for name, T in lengths.items():
        x = torch.as_tensor(np.load(tmp_path / f"{name}.npy"))
        wins = benchmark_windows("charades", float(T))
        ranges = torch.tensor([window_snippet_range(a, b, float(T), T) for a, b in wins])
        sl = model.scorer.all_pairs_logits_projected(model.scorer.project_video(x)[None], pt)[0].T  # (2, T)
        want.append(torch.stack([inside_outside(q, ranges, 3.0) for q in sl]))
    assert torch.allclose(got, torch.cat(want, 1), atol=1e-6)
    write_index(tmp_path / "idx", c, model, {"protocol": "charades", "model": {"sha256": "x"}, "features": [],
                                             "ranking": {"scale_calibration": "contrast", "contrast_weight": 3.0}}, "fp32")
    back = CorpusIndex.load(tmp_path / "idx")
    assert back.model.scale_calibration == "contrast" and back.model.contrast_weight == 3.0
    assert torch.allclose(corpus_logits(back.model, back.corpus, pt, "charades"), got, atol=1e-6)


def test_standardised_models_rank_the_corpus_per_window_size(index_pair):
    from wsra_dist.corpus.index import CorpusIndex
    from wsra_dist.corpus.search import corpus_logits
    from wsra_dist.scale_calibration import DIDEMO_GROUPS

    _, out = index_pair
    idx = CorpusIndex.load(out / "shards")
    pt = idx.model.scorer.project_text(torch.randn(3, idx.model.scorer.proj_t.in_features))
    raw = corpus_logits(idx.model, idx.corpus, pt, "didemo").double()
    mu, sd = torch.linspace(-1, 1, 6, dtype=torch.float64), torch.linspace(0.5, 2, 6, dtype=torch.float64)
    idx.model.scale_calibration, idx.model.scale_stats = "standardise", {"mu": mu, "sd": sd}
    got = corpus_logits(idx.model, idx.corpus, pt, "didemo")
    g = torch.tensor(DIDEMO_GROUPS).repeat(len(idx.corpus.videos))
    assert torch.allclose(got, (raw - mu[g]) / sd[g], atol=1e-9)


def test_the_same_source_twice_is_named(trained_didemo, tmp_path):
    from wsra_dist.corpus.index import build_index

    test = str(trained_didemo / "shards" / "test")
    with pytest.raises(DataError, match="given twice"):
        build_index(trained_didemo / "run", [test, test + "/"], tmp_path / "i", "fp16")
    assert not (tmp_path / "i").exists()


def test_across_videos_the_within_video_contrast_is_set_aside():
    from wsra_dist.corpus.candidates import contrast_layout, corpus_ranking

    model, _ = _window_model("contrast")
    assert corpus_ranking(model) == "contrast" and model.scale_calibration == "none"
    assert not contrast_layout(model, "charades")
    model, _ = _window_model("standardise")
    assert corpus_ranking(model) is None and model.scale_calibration == "standardise"

"""Shard format 2 (one sample per video), the projected DiDeMo/window paths against their materialised
references, stock-webdataset readability, checksums once per process, and the package's floors."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wsra_dist.data.records import DataError
from wsra_dist.geometry import (DIDEMO_CANDIDATES, didemo_candidate_features, didemo_candidates_from_chunks,
                                proportional_windows, window_features, window_snippet_range)
from wsra_dist.model import WSRA, DidemoLayout, ScorerConfig

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ the contract: stock reader
@pytest.mark.parametrize("which", ["planted_didemo", "planted_charades"])
def test_stock_webdataset_decode_yields_the_three_fields(which, request):
    import webdataset as wds

    root = request.getfixturevalue(which)
    d = root / "shards" / "train"
    m = json.loads((d / "manifest.json").read_text())
    urls = [str(d / s["name"]) for s in m["shards"]]
    n, queries = 0, 0
    for s in wds.WebDataset(urls, shardshuffle=False).decode():
        assert {"video.npy", "text.npy", "meta.json"} <= set(s)
        assert isinstance(s["video.npy"], np.ndarray) and s["video.npy"].shape[1] == m["dims"]["stored"]
        assert s["text.npy"].shape == (len(s["meta.json"]["queries"]), m["dims"]["text"])
        assert all({"query_id", "sentence", "times"} <= set(q) for q in s["meta.json"]["queries"])
        n += 1
        queries += len(s["meta.json"]["queries"])
    assert n == m["num_videos"] and queries == m["num_queries"]


def test_charades_video_stored_once_as_the_official_snippets(planted_charades):
    from wsra_dist.data.shards import iter_shard, load_manifest

    d = planted_charades / "shards" / "train"
    m = load_manifest(d)
    assert m["layout"] == "snippets" and m["num_videos"] < m["num_queries"]
    seen = set()
    for s in m["shards"]:
        for v in iter_shard(str(d / s["name"]), m, s["sha256"]):
            vid = v["meta.json"]["video"]
            assert vid not in seen
            seen.add(vid)
            np.testing.assert_array_equal(v["video.npy"], np.load(planted_charades / "data" / "features" / f"{vid}.npy"))
    assert len(seen) == m["num_videos"]


def test_old_format_is_refused_with_the_fix(planted_didemo, tmp_path):
    from wsra_dist.data.shards import load_manifest

    m = json.loads((planted_didemo / "shards" / "train" / "manifest.json").read_text())
    m["format"] = "wsra-dist-shards/1"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"old format wsra-dist-shards/1 .* re-run the same `wsra-dist shard`"):
        load_manifest(tmp_path)


def test_resharding_gives_identical_bytes(planted_charades, tmp_path):
    from wsra_dist.data.pack import shard_charades

    root = planted_charades / "data"
    outs = []
    for name in ("a", "b"):
        shard_charades(root / "charades_sta_train.txt", root / "Charades_v1_train.csv", root / "features",
                       tmp_path / name, 10, progress=False, cache_dir=str(planted_charades / "cache"))
        outs.append(json.loads((tmp_path / name / "manifest.json").read_text()))
    assert [s["sha256"] for s in outs[0]["shards"]] == [s["sha256"] for s in outs[1]["shards"]]


def test_compressed_shards_read_like_plain_ones_and_are_reproducible(planted_didemo, tmp_path):
    import webdataset as wds

    from wsra_dist.data.loader import EpochLoader, ShardSource
    from wsra_dist.data.pack import shard_didemo
    from wsra_dist.data.shards import load_manifest, shard_name, verify

    root = planted_didemo / "data"
    args = (root / "train_data.json", [str(root / "average_global_flow.h5")])
    kw = dict(progress=False, cache_dir=str(planted_didemo / "cache"))
    plain = shard_didemo(*args, tmp_path / "plain", 12, **kw)
    gz = [shard_didemo(*args, tmp_path / n, 12, compress=True, **kw) for n in ("a", "b")]
    assert [s["sha256"] for s in gz[0]["shards"]] == [s["sha256"] for s in gz[1]["shards"]]
    assert all(s["name"].endswith(".tar.gz") for s in gz[0]["shards"]) and gz[0]["compression"] == "gzip"
    assert gz[0]["total_bytes"] < 0.95 * plain["total_bytes"] and verify(tmp_path / "a") == []
    # the stock reader and this repo's loader see the same samples as in the plain set
    stock = [(s["meta.json"]["video"], s["video.npy"].tobytes()) for s in wds.WebDataset(
        [str(tmp_path / "a" / s["name"]) for s in gz[0]["shards"]], shardshuffle=False).decode()]
    ref = [(s["meta.json"]["video"], s["video.npy"].tobytes()) for s in wds.WebDataset(
        [str(tmp_path / "plain" / s["name"]) for s in plain["shards"]], shardshuffle=False).decode()]
    assert stock == ref
    batches = list(EpochLoader(ShardSource.open(str(tmp_path / "a")), 8, seed=0).epoch(0))
    ref_batches = list(EpochLoader(ShardSource.open(str(tmp_path / "plain")), 8, seed=0).epoch(0))
    assert [m["query_id"] for b in batches for m in b.meta] == [m["query_id"] for b in ref_batches for m in b.meta]
    assert all(torch.equal(x.video, y.video) for x, y in zip(batches, ref_batches))
    assert shard_name("pipe:curl -s http://h/shard-000001.tar.gz") == "shard-000001.tar.gz"
    # a shard nobody listed beside the set is reported, compressed or not
    (tmp_path / "a" / "shard-000099.tar.gz").write_bytes(b"x")
    assert any("shard-000099.tar.gz: not in the manifest" in p for p in verify(tmp_path / "a"))
    assert load_manifest(tmp_path / "a")["num_queries"] == plain["num_queries"]


def test_each_shard_is_hashed_once_per_process(planted_didemo, monkeypatch):
    from wsra_dist.data import shards
    from wsra_dist.data.loader import EpochLoader, ShardSource

    calls = []
    real = shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file", lambda p, *a: calls.append(str(p)) or real(p, *a))
    monkeypatch.setattr(shards, "_VERIFIED", set())
    src = ShardSource.open(str(planted_didemo / "shards" / "train"))
    loader = EpochLoader(src, 8, seed=0)
    for e in range(3):
        assert len({m["query_id"] for b in loader.epoch(e) for m in b.meta}) == src.num_samples
    assert sorted(calls) == sorted(src.urls)  # three epochs, every shard hashed exactly once


def test_persistent_workers_keep_their_state_across_epochs(planted_didemo):
    from wsra_dist.data.loader import EpochLoader, ShardSource

    src = ShardSource.open(str(planted_didemo / "shards" / "train"))
    loader = EpochLoader(src, 8, seed=0, num_workers=2)
    first = [m["query_id"] for b in loader.epoch(0) for m in b.meta]
    dl = loader._dl
    pids = sorted(w.pid for w in dl._iterator._workers)
    again = [m["query_id"] for b in loader.epoch(1) for m in b.meta]
    assert loader._dl is dl and sorted(w.pid for w in dl._iterator._workers) == pids  # not recreated
    assert sorted(first) == sorted(again) and first != again


# ------------------------------------------------------------------------------ geometry and projections
def test_batched_candidates_equal_the_reference_features():
    rng = np.random.default_rng(0)
    chunks = rng.standard_normal((3, 6, 10)) * rng.uniform(0.1, 3, (3, 6, 1))
    chunks[1, 4:] = 0.0  # a 4-chunk video: zero rows past its end
    for tef in (False, True):
        got = didemo_candidates_from_chunks(torch.from_numpy(chunks), (4, 6), tef).numpy()
        for b in range(3):
            parts = [didemo_candidate_features(chunks[b][:, :4]), didemo_candidate_features(chunks[b][:, 4:])]
            if tef:
                parts.append(np.array([[s / 6, e / 6] for s, e in DIDEMO_CANDIDATES]))
            np.testing.assert_allclose(got[b], np.concatenate(parts, 1), atol=1e-6)


def _scorer_pair(norm: str, dims: tuple[int, ...], tef: bool, depth: int = 1):
    torch.manual_seed(0)
    dv = 2 * sum(dims) + 2 * tef
    cfg = ScorerConfig(video_dim=dv, text_dim=7, hidden=16, depth=depth, input_norm=norm)
    proj = WSRA(cfg, didemo=DidemoLayout(dims, tef), project_chunks=True).double()
    mat = WSRA(cfg, didemo=DidemoLayout(dims, tef), project_chunks=False).double()
    mat.load_state_dict(proj.state_dict())
    return proj, mat


@pytest.mark.parametrize("norm", ["l2", "none", "layernorm"])
@pytest.mark.parametrize("dims, tef", [((12,), False), ((12,), True), ((5, 9), True)])
def test_projected_chunks_equal_materialised_candidates_values_and_gradients(norm, dims, tef):
    proj, mat = _scorer_pair(norm, dims, tef)
    g = torch.Generator().manual_seed(1)
    chunks = torch.randn(4, 6, sum(dims), generator=g, dtype=torch.float64)
    chunks[2, 5:] = 0.0
    text = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = torch.ones(4, 21, dtype=torch.bool)
    outs = []
    for model in (proj, mat):
        model.zero_grad()
        o = model(chunks, mask, text, text, all_pairs=True, fg_pairs=True)
        loss = o.scores.sum() + o.s_pos.sum() - o.s_neg.sum() + o.phi_all.square().sum() + o.phi_fg.sum()
        loss.backward()
        outs.append((o, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (a, ga), (b, gb) = outs
    for f in ("scores", "alpha", "fg", "bg", "s_pos", "s_neg", "phi_all", "phi_fg"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), atol=1e-5, rtol=0)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=1e-5, rtol=0)
    _, pv_a = proj.candidates(chunks)
    _, pv_b = mat.candidates(chunks)
    torch.testing.assert_close(pv_a, pv_b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("norm", ["l2", "none", "layernorm"])
def test_windows_from_projected_snippets_equal_materialised_windows(norm):
    torch.manual_seed(0)
    cfg = ScorerConfig(video_dim=9, text_dim=5, hidden=8, input_norm=norm)
    sc = WSRA(cfg).double().scorer
    rng = np.random.default_rng(2)
    for T, dur in ((37, 31.4), (5, 4.0), (1, 2.0)):
        x = rng.standard_normal((T, 9))
        wins = proportional_windows(dur)
        ranges = torch.tensor([window_snippet_range(a, b, dur, T) for a, b in wins])
        got = sc.project_windows(torch.from_numpy(x), ranges)
        ref = sc.project_video(torch.from_numpy(window_features(x, wins, dur).astype(np.float64)))
        # window_features rounds to float32, the projected path does not
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ the house
def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_data_never_imports_higher_floors():
    for p in sorted((ROOT / "wsra_dist" / "data").glob("*.py")):
        bad = {n for n in _imports(p) if any(k in n for k in ("evaluation", "objective", "model", "train", "losses"))}
        assert not bad, f"{p.name} imports {bad}"


def test_compiled_pair_kernel_equals_the_eager_kernel_values_and_gradients():
    """model.compile: torch.compile of the depth-1 pair MLP, against `_PairMLP1` (float64)."""
    from wsra_dist.model import Scorer, _compiled_pairs

    if _compiled_pairs() is None:
        pytest.skip("torch.compile cannot compile on this machine (the eager kernel is used; warned)")
    torch.manual_seed(0)
    outs = []
    for compile in (False, True):
        torch.manual_seed(0)
        sc = Scorer(ScorerConfig(video_dim=10, text_dim=7, hidden=16, depth=1, compile=compile)).double()
        pv = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
        pt = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
        y = sc.all_pairs_logits_projected(pv, pt)
        (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
        outs.append((y.detach(), pv.grad, pt.grad, *[p.grad for p in sc.tail.parameters()]))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)

"""Faults an index meets: values that overflow the index dtype, HDF5 links that lead nowhere, a tampered model
copy, a newer format, mixed dtypes, kill -9 leftovers.  Each is refused in one line naming the video or file,
and an index the user had stays as it was."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat

import h5py
import numpy as np
import pytest
import torch

from wsra_dist.data.records import DataError


@pytest.fixture(scope="module")
def built(trained_didemo, tmp_path_factory):
    from wsra_dist.corpus.index import build_index

    out = tmp_path_factory.mktemp("faults") / "idx"
    build_index(trained_didemo / "run", [str(trained_didemo / "shards" / "test")], out, "fp16")
    return trained_didemo, out


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _with_video_scaled(corpus, v: int, factor: float):
    """The corpus with video v's stored projections multiplied by `factor` (finite in fp32)."""
    s = corpus.store
    g = s.g.float().clone()
    local = s.local.float().clone()
    g[v] *= factor
    local[:, :, v] *= factor
    store = type(s)(g, local, s.den, s.norm, s.tef, s.bias)
    return dataclasses.replace(corpus, store=store)


def test_values_beyond_fp16_are_refused_before_the_old_index_is_touched(built):
    from wsra_dist.corpus.index import CorpusIndex, write_index

    _, out = built
    before = _snapshot(out)
    idx = CorpusIndex.load(out)
    bad = _with_video_scaled(idx.corpus, 3, 1e20)
    assert bad.store.check_finite()  # finite in fp32: only the fp16 index would hold inf
    with pytest.raises(DataError, match=rf"video {idx.corpus.videos[3]!r}.*not finite at fp16.*nothing was written"):
        write_index(out, bad, idx.model, dict(idx.manifest), "fp16")
    assert _snapshot(out) == before
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))
    # fp32 holds them: the index is written and loads
    write_index(out.with_name("fp32"), bad, idx.model, dict(idx.manifest), "fp32")
    assert CorpusIndex.load(out.with_name("fp32")).corpus.videos == idx.corpus.videos


def test_dense_and_snippet_rows_name_their_video():
    from wsra_dist.corpus.candidates import Corpus
    from wsra_dist.corpus.index import bad_video
    from wsra_dist.corpus.store import DenseStore, SnippetStore

    pv = torch.zeros(7, 3)
    pv[5, 1] = 1e30  # candidate 5 belongs to video 2
    video_of = np.array([0, 0, 1, 1, 1, 2, 2])
    c = Corpus(["a", "b", "c"], [1.0, 1.0, 1.0], DenseStore(pv), video_of, np.zeros(7), np.ones(7), False)
    assert bad_video(c, c.store.tensors(torch.float16)) == 2
    assert bad_video(c, c.store.tensors(torch.float32)) is None
    snip = SnippetStore(pv, torch.tensor([0, 2, 5]), torch.tensor([2, 3, 2]), torch.tensor([[0, 1], [0, 2], [1, 2]]),
                        torch.tensor([0, 1, 2]))
    cs = Corpus(["a", "b", "c"], [1.0] * 3, snip, np.array([0, 1, 2]), np.zeros(3), np.ones(3), False)
    assert bad_video(cs, snip.tensors(torch.float16)) == 2
    pv[3, 0] = float("nan")  # video 1, first in order
    assert bad_video(cs, snip.tensors(torch.float32)) == 1


def test_hdf5_links_that_lead_nowhere_are_named(tmp_path):
    from wsra_dist.corpus.features_source import feature_videos

    f = tmp_path / "feats.h5"
    with h5py.File(f, "w") as h:
        h["ok"] = np.zeros((6, 4), "f4")
        h["dangling"] = h5py.SoftLink("/nowhere")
    with pytest.raises(DataError, match=r"feats\.h5:dangling: a soft link that cannot be followed \(to /nowhere\)"):
        feature_videos(str(f))
    with h5py.File(f, "a") as h:
        del h["dangling"]
        h["ext"] = h5py.ExternalLink(str(tmp_path / "missing.h5"), "/x")
    with pytest.raises(DataError, match=r"feats\.h5:ext: an external link that cannot be followed .*missing\.h5"):
        feature_videos(str(f))
    with h5py.File(f, "a") as h:
        del h["ext"]
        g = h.create_group("v_1")
        g["c3d_features"] = h5py.SoftLink("/gone")
    with pytest.raises(DataError, match=r"feats\.h5:v_1/c3d_features: a soft link"):
        feature_videos(str(f))
    with h5py.File(f, "a") as h:
        del h["v_1"]
        h["linked"] = h5py.SoftLink("/ok")  # a link that resolves is a video like any other
    assert [n for n, _ in feature_videos(str(f))] == ["linked", "ok"]


def _copy(out, tmp_path, name):
    d = tmp_path / name
    shutil.copytree(out, d)
    return d


def test_a_tampered_model_copy_is_refused(built, tmp_path):
    from wsra_dist.corpus.index import CorpusIndex

    _, out = built
    m = json.loads((out / "index.json").read_text())
    assert set(m["model"]["copy_sha256"]) == {"config.json", "model.safetensors"}
    d = _copy(out, tmp_path, "tampered")
    cfg = json.loads((d / "model" / "config.json").read_text())
    cfg["model"]["chunk_consistency"] = 123.0
    (d / "model" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match=r"model/config\.json: changed .*rebuild the index"):
        CorpusIndex.load(d)
    d = _copy(out, tmp_path, "gone")
    (d / "model" / "model.safetensors").unlink()
    with pytest.raises(DataError, match=r"model\.safetensors: missing"):
        CorpusIndex.load(d)


def test_newer_formats_and_mixed_dtypes_are_refused(built, tmp_path):
    from safetensors.torch import load_file, save_file

    from wsra_dist.corpus.index import CorpusIndex, file_sha256

    _, out = built
    d = _copy(out, tmp_path, "v3")
    m = json.loads((d / "index.json").read_text())
    (d / "index.json").write_text(json.dumps({**m, "format": "wsra-dist-index/3"}))
    with pytest.raises(DataError, match=r"format 'wsra-dist-index/3' is not one this wsra-dist reads"):
        CorpusIndex.load(d)
    d = _copy(out, tmp_path, "mixed")
    f = d / "candidates.safetensors"
    t = {k: (v.float() if k in ("g", "local") else v) for k, v in load_file(str(f)).items()}
    save_file(t, str(f))
    (d / "index.json").write_text(json.dumps({**m, "sha256": file_sha256(f)}))  # index.json still says fp16
    with pytest.raises(DataError, match=r"tensor 'g' is torch.float32, but index.json says fp16"):
        CorpusIndex.load(d)


def test_index_files_follow_the_umask_and_kill_9_leftovers_are_cleaned(built, tmp_path):
    from wsra_dist.corpus.index import CorpusIndex, write_index

    _, out = built
    for p in [out / "index.json", out / "candidates.safetensors", out / "model" / "model.safetensors"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~_umask(), p
    idx = CorpusIndex.load(out)
    target = tmp_path / "idx"
    dead = 2 ** 22 + 12345  # above Linux's default pid_max: no such process
    for kind in ("tmp", "old"):
        (tmp_path / f".idx.{kind}-{dead}").mkdir()
        (tmp_path / f".idx.{kind}-{dead}" / "candidates.safetensors").write_bytes(b"half")
    live = tmp_path / f".idx.tmp-{os.getpid() + 0}"  # this process: alive, its staging is not someone's leftover
    mine = tmp_path / f".idx.tmp-{os.getppid()}"
    mine.mkdir()
    write_index(target, idx.corpus, idx.model, dict(idx.manifest), "fp16")
    assert not (tmp_path / f".idx.tmp-{dead}").exists() and not (tmp_path / f".idx.old-{dead}").exists()
    assert mine.exists() and not live.exists()
    assert CorpusIndex.load(target).corpus.videos == idx.corpus.videos


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_index_asks_only_for_flags_it_has(tmp_path):
    from wsra_dist.corpus.features_source import read_features_corpus
    from wsra_dist.model import WSRA

    info = {"benchmark": "charades", "dims": {"video": 8, "text": 4}, "layout": None,
            "model": {"hidden": 5, "depth": 1, "dropout": 0.0, "input_norm": "l2"}}
    np.save(tmp_path / "AAA01.npy", np.zeros((4, 8), np.float32))
    with pytest.raises(DataError) as e:
        read_features_corpus(WSRA.from_info(info).eval(), info, str(tmp_path), "cpu")
    assert "--fps SNIPPETS_PER_SECOND" in str(e.value) and "--duration" not in str(e.value)

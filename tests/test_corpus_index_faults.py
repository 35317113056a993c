"""Faults an index meets: values that overflow the index dtype, HDF5 links that lead nowhere, a tampered model
copy, a newer format, mixed dtypes, kill -9 leftovers.  Each is refused in one line naming the video or file,
and an index the user had stays as it was."""

from __future__ import annotations

import dataclasses
from pathlib import Path
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


def test_a_writer_killed_between_its_renames_loses_nothing(built, tmp_path):
    """kill -9 after NAME -> .NAME.old-PID and before staging -> NAME: the next run puts the old index back."""
    from wsra_dist.corpus.index import CorpusIndex, build_index

    root, out = built
    idx = tmp_path / "idx"
    shutil.copytree(out, tmp_path / f".idx.old-{2 ** 22 + 777}")  # what the killed writer left, and no idx/
    n = len(CorpusIndex.load(out).corpus.videos)
    with pytest.raises(DataError, match="already holds video"):  # the recovered index is appended to, not replaced
        build_index(root / "run", [str(root / "shards" / "test")], idx, None)
    assert len(CorpusIndex.load(idx).corpus.videos) == n and not list(tmp_path.glob(".idx.*"))


def test_index_options_and_paths(built, tmp_path, monkeypatch):
    from wsra_dist.corpus.index import CorpusIndex, build_index

    root, out = built
    with pytest.raises(DataError, match="--fps gives the time axis of --features"):
        build_index(root / "run", [str(root / "shards" / "test")], tmp_path / "x", "fp16", fps=7.0)
    with pytest.raises(DataError, match="no such run folder"):
        build_index(tmp_path / "nope", [str(root / "shards" / "test")], tmp_path / "x", "fp16")
    empty = tmp_path / "here"
    empty.mkdir()
    monkeypatch.chdir(empty)
    build_index(root / "run", [str(root / "shards" / "test")], ".", "fp32")  # --out . in an empty folder
    assert CorpusIndex.load(empty).manifest["dtype"] == "fp32"
    assert Path(CorpusIndex.load(empty).manifest["features"][0]["source"]).is_absolute()
    # appending without --dtype keeps the index's own
    build_index(root / "run", [str(root / "shards" / "val")], empty, None)
    assert CorpusIndex.load(empty).manifest["dtype"] == "fp32"
    # two sources of one command holding the same video: the second source is named
    shutil.copytree(root / "shards" / "val", tmp_path / "val_copy")
    with pytest.raises(DataError, match=r"val_copy: video .* is also in an earlier source of this command"):
        build_index(root / "run", [str(root / "shards" / "val"), str(tmp_path / "val_copy")], tmp_path / "two", "fp16")
    assert not (tmp_path / "two").exists()


@pytest.mark.parametrize("edit,want", [
    (lambda m: m["videos"][0].update(duration="abc"), r"videos\[0\] is damaged"),
    (lambda m: m["videos"][1].update(duration=-5), r"videos\[1\] .*duration -5 is not a positive"),
    (lambda m: m["videos"][1].update(video=m["videos"][0]["video"]), r"videos\[1\]: video name .* given twice"),
    (lambda m: m.update(layout="snippetz"), r"layout 'snippetz' is not one of"),
    (lambda m: m.update(protocol="tvr"), r"protocol 'tvr' is not didemo"),
    (lambda m: m.update(candidates=5), r"candidates 5 is not the videos'"),
    (lambda m: m["videos"][2].update(first=0), r"videos\[2\] .*first 0 / count"),
    (lambda m: m.update(hidden=3), r"do not fit index.json's hidden"),
])
def test_hand_edited_index_json_is_refused_by_field(built, tmp_path, edit, want):
    from wsra_dist.corpus.index import CorpusIndex

    _, out = built
    d = _copy(out, tmp_path, "edited")
    m = json.loads((d / "index.json").read_text())
    edit(m)
    (d / "index.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=want):
        CorpusIndex.load(d)


def test_search_names_what_is_wrong(built, tmp_path):
    from wsra_dist.corpus.index import CorpusIndex
    from wsra_dist.corpus.search import Searcher

    _, out = built
    with pytest.raises(DataError, match="no such index folder"):
        CorpusIndex.load(tmp_path / "nope")
    s = Searcher(CorpusIndex.load(out), device="cpu")
    with pytest.raises(DataError, match="one sentence .* got list"):
        s.search(["a", "b"])

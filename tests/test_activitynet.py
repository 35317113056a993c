"""ActivityNet Captions: the reader on the real release files (counts, defects, both rules, stable ids), the
C3D feature file, the evaluator on hand-computed cases and its refusals, moment_detr lines scored like native
ones, the planted profile, and shard -> train -> evaluate --checkpoint on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsra_dist.data import activitynet as AN
from wsra_dist.data.records import DataError
from wsra_dist.evaluation import formats as F
from wsra_dist.evaluation.runner import evaluate_predictions
from wsra_dist.evaluation.scoring import ACTIVITYNET_KEYS, reference_rows, score_charades
from wsra_dist.geometry import benchmark_windows

from .helpers import SHARED

ROOT = Path(__file__).resolve().parents[1]
REAL = SHARED / "activitynet"
requires_activitynet = pytest.mark.skipif(
    not (REAL / "val_2.json").is_file(), reason=f"real ActivityNet Captions files not found at {REAL} (set WSRA_SHARED_DATA)")


from tests.helpers import run_cli as _cli  # noqa: E402


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ the real release files
@requires_activitynet
@pytest.mark.parametrize("split, videos, sentences, past_end, start_ge_end", [
    ("train", 10009, 37421, 261, 4), ("val_1", 4917, 17505, 134, 0), ("val_2", 4885, 17031, 111, 0)])
def test_reader_real_files_counts_defects_and_rules(split, videos, sentences, past_end, start_ge_end):
    clamp, st = AN.read_annotations(REAL / f"{split}.json", "clamp")
    strict, st2 = AN.read_annotations(REAL / f"{split}.json", "strict")
    assert (st["videos"], st["sentences"]) == (st2["videos"], st2["sentences"]) == (videos, sentences)
    # clamp: the ends past the duration are clipped, start >= end dropped
    assert st["clamped"] == past_end and st["dropped_start_ge_end"] == start_ge_end
    assert len(clamp) == st["kept"] == sentences - start_ge_end
    # strict: both kinds dropped (no real moment has both defects)
    assert st2["dropped_past_end"] == past_end and st2["dropped_start_ge_end"] == start_ge_end
    assert len(strict) == st2["kept"] == sentences - past_end - start_ge_end
    assert all(0 <= r.times[0][0] < r.times[0][1] <= r.duration for r in clamp + strict)
    # query_id: running index over videos and their sentences, assigned before the rule, so stable across rules
    assert clamp[0].query_id == 0 and max(r.query_id for r in clamp) <= sentences - 1
    assert len({r.query_id for r in clamp}) == len(clamp)
    by_id = {r.query_id: r for r in clamp}
    assert all(by_id[r.query_id].sentence == r.sentence and by_id[r.query_id].video == r.video for r in strict)
    raw = json.loads((REAL / f"{split}.json").read_text())
    flat = [(v, k, t) for v, e in raw.items() for k, t in enumerate(e["sentences"])]
    for r in clamp[:: max(1, len(clamp) // 500)]:
        v, k, t = flat[r.query_id]
        assert (r.video, r.extra["sentence"], r.sentence) == (v, k, t.strip())


@requires_activitynet
def test_reader_real_known_records_and_quirks():
    val2, _ = AN.read_annotations(REAL / "val_2.json")
    assert (val2[0].video, val2[0].times, val2[0].duration) == ("v_yINX46xPRf0", [[0.0, 31.2]], 159.99)
    assert val2[1].sentence == "The people are wearing oxygen thanks while in the pool."  # leading space stripped
    train, _ = AN.read_annotations(REAL / "train.json")
    assert train[0].video == "v_QOlSCBRmfWY" and train[0].times == [[0.83, 19.86]]
    # sentences keep an inner newline or '#' (6 in train hold a '#')
    assert sum("#" in r.sentence for r in train) == 6 and any("\n" in r.sentence for r in train)
    tr_strict, _ = AN.read_annotations(REAL / "train.json", "strict")
    dropped = {r.query_id for r in train} - {r.query_id for r in tr_strict}
    assert len(dropped) == 261


@requires_activitynet
def test_val2_exact_chance_and_oracle_of_the_windows():
    """The numbers docs/method.md quotes for the ActivityNet windows (20/40/80/100 %, stride a quarter)."""
    for rule, n, chance, oracle in [
        ("clamp", 17031, [49.25, 28.16, 11.98, 85.40, 69.25, 45.06, 19.16], [97.24, 89.96, 82.58, 97.24, 89.96, 82.58, 72.70]),
        ("strict", 16920, [49.20, 28.15, 11.98, 85.39, 69.21, 45.05, 19.15], [97.25, 89.94, 82.53, 97.25, 89.94, 82.53, 72.65]),
    ]:
        recs, _ = AN.read_annotations(REAL / "val_2.json", rule)
        truth = [{"query_id": r.query_id, "times": r.times, "duration": r.duration} for r in recs]
        ref = reference_rows("activitynet", truth)
        assert len(truth) == n
        assert [round(ref["Chance"][k], 2) for k in ACTIVITYNET_KEYS] == chance, rule
        assert [round(ref["Upper bound"][k], 2) for k in ACTIVITYNET_KEYS] == oracle, rule


@requires_activitynet
def test_evaluate_real_val2_prediction_files_both_formats(tmp_path):
    ann = REAL / "val_2.json"
    recs, _ = AN.read_annotations(ann)
    native = _jsonl(tmp_path / "n.jsonl", [{"query_id": r.query_id, "video": r.video,
                                            "moments": [r.times[0], [0.0, r.duration]]} for r in recs])
    md = _jsonl(tmp_path / "md.jsonl", [F.to_md({"query_id": r.query_id, "moments": [r.times[0], [0.0, r.duration]]},
                                                "activitynet", query=r.sentence, vid=r.video) for r in recs])
    p = _cli("evaluate", "--predictions", native, "--annotations", ann, "--protocol", "activitynet", "--out", tmp_path / "a")
    _cli("evaluate", "--predictions", md, "--annotations", ann, "--protocol", "activitynet", "--out", tmp_path / "b")
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b"))
    assert list(a)[:7] == list(ACTIVITYNET_KEYS) and a["num_queries"] == 17031
    assert all(a[k] == 100.0 for k in ACTIVITYNET_KEYS)
    assert {k: a[k] for k in ACTIVITYNET_KEYS} == {k: b[k] for k in ACTIVITYNET_KEYS}
    assert "CPL (CVPR 2022" in p.stdout and "| 79.86 | 53.67 | 31.24 | 87.24 | 63.05 | 43.13 |" in p.stdout
    assert "| Chance (exact, these queries) | - | 49.25 | 28.16 | 11.98 |" in p.stdout
    # the strict rule has 111 fewer queries: this file predicts them, and they are skipped with one warning
    # naming the filter (issue 24; they used to be refused as "name no annotated query")
    p = _cli("evaluate", "--predictions", native, "--annotations", ann, "--protocol", "activitynet",
             "--activitynet-filter", "strict", "--out", tmp_path / "c", check=False)
    assert p.returncode == 0 and p.stderr.count("warning:") == 1, p.stderr
    assert "111 predictions are for queries that --activitynet-filter strict drops" in p.stderr
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["num_queries"] == 16920


# ------------------------------------------------------------------------------ reader errors
def _write_ann(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("entry, msg", [
    ({"duration": 10, "timestamps": [[0, 1]]}, r"video 'v_b': needs keys 'duration', 'timestamps', 'sentences'"),
    ({"duration": -1, "timestamps": [[0, 1]], "sentences": ["a"]}, r"video 'v_b': duration -1 is not a positive"),
    ({"duration": 10, "timestamps": [[0, 1], [1, 2]], "sentences": ["a"]}, r"video 'v_b': 2 timestamps but 1 sentences"),
    ({"duration": 10, "timestamps": [[0, 1], [1, "x"]], "sentences": ["a", "b"]},
     r"video 'v_b' sentence 1: timestamp \[1, 'x'\] is not a \[start, end\] pair"),
    ({"duration": 10, "timestamps": [[0, 1], [1, 2]], "sentences": ["a", "  "]}, r"video 'v_b' sentence 1: empty"),
])
def test_reader_errors_name_file_video_and_sentence(tmp_path, entry, msg):
    p = _write_ann(tmp_path / "bad.json", {"v_a": {"duration": 5.0, "timestamps": [[0, 1]], "sentences": ["ok"]},
                                           "v_b": entry})
    with pytest.raises(DataError, match=rf"bad.json: {msg}"):
        AN.read_annotations(p)


def test_reader_refuses_other_shapes_and_rules(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="x.json: not JSON"):
        AN.read_annotations(tmp_path / "x.json")
    with pytest.raises(DataError, match="expected one JSON object"):
        AN.read_annotations(_write_ann(tmp_path / "l.json", [["v_a", 3.0, [0, 1], "s"]]))
    with pytest.raises(DataError, match="activitynet filter must be one of"):
        AN.read_annotations(_write_ann(tmp_path / "ok.json", {}), "loose")


def test_reader_negative_start_clamped_or_dropped(tmp_path):
    p = _write_ann(tmp_path / "a.json", {"v_a": {"duration": 10.0, "timestamps": [[-1.0, 4.0], [2, 2], [3, 12]],
                                                 "sentences": ["a", "b", "c"]}})
    clamp, st = AN.read_annotations(p)
    assert [r.times for r in clamp] == [[[0.0, 4.0]], [[3.0, 10.0]]] and [r.query_id for r in clamp] == [0, 2]
    assert st["clamped"] == 2 and st["dropped_start_ge_end"] == 1
    strict, st2 = AN.read_annotations(p, "strict")
    assert strict == [] and (st2["dropped_before_start"], st2["dropped_start_ge_end"], st2["dropped_past_end"]) == (1, 1, 1)


# ------------------------------------------------------------------------------ C3D features
def test_c3d_features_group_dataset_and_errors(tmp_path):
    import h5py

    x = np.arange(6 * 5, dtype=np.float64).reshape(6, 5)
    with h5py.File(tmp_path / "c3d.hdf5", "w") as f:
        f.create_group("v_a").create_dataset("c3d_features", data=x)
        f.create_dataset("v_flat", data=x)  # a repacked file: one dataset per video
        f.create_group("v_empty").create_dataset("other", data=x)
        f.create_group("v_nan").create_dataset("c3d_features", data=np.full((3, 5), np.nan))
    feats = AN.C3DFeatures(tmp_path / "c3d.hdf5")
    a = feats.get("v_a")
    assert a.dtype == np.float32 and a.shape == (6, 5) and "v_a" in feats and "v_b" not in feats
    np.testing.assert_array_equal(a, feats.get("v_flat"))
    with pytest.raises(DataError, match=r"c3d.hdf5:v_empty/c3d_features: cannot read features: .*no dataset 'c3d_features'"):
        feats.get("v_empty")
    with pytest.raises(DataError, match=r"v_nan/c3d_features: contains NaN"):
        feats.get("v_nan")
    with pytest.raises(DataError, match="not a folder"):
        AN.C3DFeatures(tmp_path)


def _tiny_benchmark(root: Path, nan_video: bool = False) -> tuple[Path, Path]:
    import h5py

    ann = _write_ann(root / "ann.json", {
        "v_a": {"duration": 20.0, "timestamps": [[0, 8], [5, 25]], "sentences": ["A man opens the door.", " He waves."]},
        "v_b": {"duration": 30.0, "timestamps": [[3, 3], [10, 20]], "sentences": ["Bad.", " A dog runs."]},
        "v_c": {"duration": 12.0, "timestamps": [[1, 6]], "sentences": ["Someone sits."]},
    })
    rng = np.random.default_rng(0)
    with h5py.File(root / "c3d.hdf5", "w") as f:
        for vid, T in (("v_a", 10), ("v_b", 15), ("v_c", 6)):
            x = rng.standard_normal((T, 500))
            if nan_video and vid == "v_c":
                x[2, 7] = np.nan
            f.create_group(vid).create_dataset("c3d_features", data=x.astype(np.float32))
    return ann, root / "c3d.hdf5"


def test_shard_checks_every_video_before_the_text_model(tmp_path, monkeypatch):
    from wsra_dist.data import text
    from wsra_dist.data.pack import shard_activitynet

    ann, feats = _tiny_benchmark(tmp_path, nan_video=True)

    def no_text_model(*a, **k):
        raise AssertionError("the text model was loaded before the features were checked")

    monkeypatch.setattr(text, "TextEncoder", no_text_model)
    with pytest.raises(DataError, match=r"c3d.hdf5:v_c/c3d_features: contains NaN or inf \(first at snippet 2"):
        shard_activitynet(ann, feats, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    # a video missing from the features: named with its file, video and sentence, or skipped and counted
    import h5py

    with h5py.File(feats, "a") as f:
        del f["v_c"]
    with pytest.raises(DataError, match=r"ann.json: video 'v_c' sentence 0: no features at .*c3d.hdf5:v_c"):
        shard_activitynet(ann, feats, tmp_path / "out", progress=False)


def test_shard_layout_ids_and_resample(tmp_path):
    from wsra_dist.data.pack import shard_activitynet
    from wsra_dist.data.shards import iter_shard, load_manifest, verify

    ann, feats = _tiny_benchmark(tmp_path)
    m = shard_activitynet(ann, feats, tmp_path / "out", shard_size=2, resample=8, progress=False,
                          cache_dir=str(tmp_path / "cache"))
    assert m["benchmark"] == "activitynet" and m["layout"] == "snippets" and m["dims"]["snippets"] == 8
    assert m["reader"]["activitynet_filter"] == "clamp" and m["reader"]["resample"] == 8
    assert (m["num_videos"], m["num_queries"]) == (3, 4) and m["reader"]["dropped_start_ge_end"] == 1
    assert verify(tmp_path / "out") == []
    man = load_manifest(tmp_path / "out")
    samples = [s for sh in man["shards"] for s in iter_shard(str(tmp_path / "out" / sh["name"]), man, sh["sha256"])]
    queries = {q["query_id"]: (s["meta.json"]["video"], q) for s in samples for q in s["meta.json"]["queries"]}
    assert sorted(queries) == [0, 1, 3, 4]  # id 2 (start >= end) dropped, the others keep theirs
    assert queries[1][1]["times"] == [[5.0, 20.0]] and queries[1][1]["sentence"] == "He waves."
    assert queries[3][1]["sentence_index"] == 1 and queries[3][0] == "v_b"
    assert all(s["video.npy"].shape == (8, 500) for s in samples)
    strict = shard_activitynet(ann, feats, tmp_path / "strict", activitynet_filter="strict", progress=False,
                               cache_dir=str(tmp_path / "cache"))
    assert strict["num_queries"] == 3 and strict["reader"]["dropped_past_end"] == 1


# ------------------------------------------------------------------------------ the evaluator by hand
# v_a: ids 0, 1; v_b: ids 2 (end 45 > 40: clamped to 40; dropped by strict), 3; v_c: id 4 (start >= end,
# dropped by both rules), id 5.
HAND = {
    "v_a": {"duration": 40.0, "timestamps": [[0, 10], [10, 20]], "sentences": ["one", " two"]},
    "v_b": {"duration": 40.0, "timestamps": [[0, 45], [5, 15]], "sentences": ["three", " four"]},
    "v_c": {"duration": 10.0, "timestamps": [[8, 8], [0, 5]], "sentences": ["five", " six"]},
}
HAND_PREDS = {
    0: ("v_a", [[0, 1.5]]),  # IoU 0.15
    1: ("v_a", [[10, 14], [10, 20]]),  # top-1 IoU 0.4, top-2 1.0
    2: ("v_b", [[0, 20], [30, 40]]),  # IoU 0.5 with the clamped [0, 40]
    3: ("v_b", [[20, 30], [30, 40], [0, 1], [35, 40], [25, 30], [5, 15]]),  # the hit is 6th: no R@5
    5: ("v_c", [[0, 5]]),  # IoU 1
}


def _hand_files(tmp_path: Path, ids=(0, 1, 2, 3, 5), fmt: str = "native", extra=()) -> tuple[Path, Path]:
    ann = _write_ann(tmp_path / "hand.json", HAND)
    rows = []
    for q in list(ids) + list(extra):
        vid, moms = HAND_PREDS.get(q, ("v_a", [[0, 1]]))
        if fmt == "native":
            rows.append({"query_id": q, "video": vid, "moments": moms})
        else:
            rows.append(F.to_md({"query_id": q, "moments": moms}, "activitynet", query=f"q{q}", vid=vid))
    return ann, _jsonl(tmp_path / f"p_{fmt}.jsonl", rows)


def test_hand_computed_metrics_both_rules_and_both_formats(tmp_path):
    ann, native = _hand_files(tmp_path)
    m, md = evaluate_predictions(native, ann, "activitynet", tmp_path / "res")
    # R@1 at 0.1: ids 0, 1, 2, 5; at 0.3: 1, 2, 5; at 0.5: 2, 5.  R@5 adds id 1's second moment.
    want = {"R@1,IoU=0.1": 80.0, "R@1,IoU=0.3": 60.0, "R@1,IoU=0.5": 40.0,
            "R@5,IoU=0.1": 80.0, "R@5,IoU=0.3": 60.0, "R@5,IoU=0.5": 60.0, "mIoU": 100 * (0.15 + 0.4 + 0.5 + 0 + 1) / 5}
    assert m == pytest.approx(want)
    written = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert list(written)[:7] == list(ACTIVITYNET_KEYS) == list(want)
    assert written["num_queries"] == 5 and written["settings"]["activitynet_filter"] == "clamp"
    assert "ActivityNet Captions: 5 queries (clamp rule)" in md and "CPL" in md
    # the same moments as moment_detr lines score identically
    _, mdfile = _hand_files(tmp_path, fmt="md")
    m2, _ = evaluate_predictions(mdfile, ann, "activitynet", tmp_path / "res2")
    assert m2 == m
    # strict IoU (> m): id 2's 0.5 is no longer a hit at 0.5
    m3, _ = evaluate_predictions(native, ann, "activitynet", tmp_path / "res3", strict=True)
    assert (m3["R@1,IoU=0.5"], m3["R@5,IoU=0.5"]) == (20.0, 40.0)
    # strict rule: id 2 is not annotated any more
    _, native4 = _hand_files(tmp_path, ids=(0, 1, 3, 5))
    m4, _ = evaluate_predictions(native4, ann, "activitynet", tmp_path / "res4", activitynet_filter="strict")
    assert m4 == pytest.approx({"R@1,IoU=0.1": 75.0, "R@1,IoU=0.3": 50.0, "R@1,IoU=0.5": 25.0, "R@5,IoU=0.1": 75.0,
                                "R@5,IoU=0.3": 50.0, "R@5,IoU=0.5": 50.0, "mIoU": 100 * (0.15 + 0.4 + 0 + 1) / 4})


def test_nms_before_top_n():
    truth = [{"query_id": 0, "times": [[20.0, 40.0]], "duration": 40.0}]
    preds = [{"query_id": 0, "moments": [[0, 10], [0, 10.5], [0, 11], [0, 10.2], [0, 10.1], [20, 40]]}]
    assert score_charades(preds, truth, protocol="activitynet")["R@5,IoU=0.5"] == 0.0
    assert score_charades(preds, truth, protocol="activitynet", nms=0.5)["R@5,IoU=0.5"] == 100.0


@pytest.mark.parametrize("fmt", ["native", "md"])
def test_missing_duplicate_extra_and_wrong_video_refused(tmp_path, fmt):
    ann, _ = _hand_files(tmp_path)
    # id 0 missing, id 1 twice, id 4 (dropped by the clamp rule: start >= end; skipped, not unknown) and 99 not
    # annotated at all
    _, bad = _hand_files(tmp_path, ids=(1, 2, 3, 5), fmt=fmt, extra=(1, 4, 99))
    with pytest.raises(DataError) as e:
        evaluate_predictions(bad, ann, "activitynet", tmp_path / "r")
    msg = str(e.value)
    assert "1 annotated queries have no prediction (e.g. query_id 0)" in msg
    assert "1 predictions name no annotated query" in msg and "query_id 99" in msg and "query_id 4" not in msg
    assert "1 queries are predicted more than once (e.g. query_id 1" in msg
    rows = [json.loads(l) for l in _hand_files(tmp_path, fmt=fmt)[1].read_text().splitlines()]
    rows[0]["video" if fmt == "native" else "vid"] = "v_c"
    with pytest.raises(DataError, match=r"line 1: query_id 0: video 'v_c' but the annotations give 'v_a'"):
        evaluate_predictions(_jsonl(tmp_path / "v.jsonl", rows), ann, "activitynet", tmp_path / "r")
    rows = [json.loads(l) for l in _hand_files(tmp_path, fmt=fmt)[1].read_text().splitlines()]
    if fmt == "native":
        rows[0]["moments"] = [[0, 50]]
    else:
        rows[0]["pred_relevant_windows"] = [[0, 50, 1.0]]
    p = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"ActivityNet Captions predictions hold invalid moments.*ends after the video's "
                                        r"duration 40 s"):
        evaluate_predictions(p, ann, "activitynet", tmp_path / "r")
    m, _ = evaluate_predictions(p, ann, "activitynet", tmp_path / "r", clip_predictions=True)
    assert m["R@1,IoU=0.1"] == 80.0  # [0, 40] against [0, 10]: IoU 0.25


def test_protocol_enums_agree():
    from wsra_dist import cli as C

    assert tuple(m.value for m in C.ActivityNetFilter) == AN.FILTERS
    assert "activitynet" in {m.value for m in C.Profile} and "activitynet" in {m.value for m in C.Protocol}
    assert F.protocol("activitynet").id_key == "query_id"
    w = benchmark_windows("activitynet", 100.0)
    assert len(w) == 27 and w[:, 1].max() == 100.0 and [0.0, 100.0] in w.tolist() and [20.0, 100.0] in w.tolist()
    assert len(benchmark_windows("charades", 30.0)) == 47 == len(benchmark_windows(None, 30.0))


# ------------------------------------------------------------------------------ planted profile end to end
def test_synth_activitynet_profile_format(tmp_path):
    import h5py

    from wsra_dist.data.synthetic import synth

    synth("activitynet", tmp_path / "a", 40, seed=3)
    synth("activitynet", tmp_path / "b", 40, seed=3)
    for name in ("train.json", "val_1.json", "val_2.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    raw = json.loads((tmp_path / "a" / "val_2.json").read_text())
    assert set(raw) == set(json.loads((tmp_path / "a" / "val_1.json").read_text()))  # same videos, as released
    assert all(v.startswith("v_") and len(v) == 13 for v in raw)
    recs, st = AN.read_annotations(tmp_path / "a" / "train.json")
    assert st["videos"] == 40 and st["kept"] > 80
    with h5py.File(tmp_path / "a" / "sub_activitynet_v1-3.c3d.hdf5") as f:
        x = f[recs[0].video]["c3d_features"]
        assert x.shape[1] == 500 and abs(x.shape[0] - 0.5 * recs[0].duration) <= 1
    frac = np.mean([(r.times[0][1] - r.times[0][0]) / r.duration for r in recs])
    assert 0.25 < frac < 0.45 and 60 < np.mean([r.duration for r in recs]) < 200


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """synth -> shard (the contract flags) -> a short training run of the planted recipe."""
    from wsra_dist.config import load_recipe
    from wsra_dist.train import train

    root = tmp_path_factory.mktemp("planted_activitynet")
    data = root / "data"
    out = _cli("synth", "--profile", "activitynet", "--out", data, "--videos", "60", "--seed", "1").stdout
    assert "Chance" in out and "R@1,IoU=0.5" in out
    for s in ("train", "val_2"):
        _cli("shard", "activitynet", "--annotations", data / f"{s}.json", "--features",
             data / "sub_activitynet_v1-3.c3d.hdf5", "--out", root / "shards" / s, "--activitynet-filter", "clamp",
             "--resample", "40", "--shard-size", "25", "--quiet", "--cache-dir", root / "cache")
    r = load_recipe(ROOT / "recipes" / "planted_activitynet.yaml",
                    [f"data.train_shards={root / 'shards' / 'train'}", "data.val_shards=", "data.test_shards=",
                     "train.epochs=2", f"output_dir={root / 'run'}", "train.progress=false"])
    train(r)
    return root


def test_shard_train_evaluate_checkpoint_round_trip(planted_run, tmp_path):
    root = planted_run
    p = _cli("evaluate", "--checkpoint", root / "run", "--shards", root / "shards" / "val_2", "--protocol",
             "activitynet", "--out", tmp_path / "res")
    m = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert list(m)[:7] == list(ACTIVITYNET_KEYS) and m["protocol"] == "activitynet"
    assert m["settings"]["activitynet_filter"] == "clamp"
    assert "CPL (CVPR 2022" in p.stdout and "Chance (exact, these queries)" in p.stdout
    preds = [json.loads(l) for l in (tmp_path / "res" / "predictions.jsonl").read_text().splitlines()]
    recs, _ = AN.read_annotations(root / "data" / "val_2.json")
    assert [q["query_id"] for q in preds] == [r.query_id for r in recs] and m["num_queries"] == len(recs)
    dur = {r.query_id: r.duration for r in recs}
    for q in preds[:20]:  # every prediction ranks the ActivityNet windows
        want = np.round(benchmark_windows("activitynet", dur[q["query_id"]]), 4)
        assert sorted(map(tuple, q["moments"])) == sorted(map(tuple, want.tolist()))
    # the moment_detr file it wrote, scored against the official annotation file, gives the same metrics
    _cli("evaluate", "--predictions", tmp_path / "res" / "predictions_md.jsonl", "--annotations",
         root / "data" / "val_2.json", "--protocol", "activitynet", "--out", tmp_path / "md")
    m2 = json.loads((tmp_path / "md" / "metrics.json").read_text())
    assert {k: m2[k] for k in ACTIVITYNET_KEYS} == {k: m[k] for k in ACTIVITYNET_KEYS}
    assert (tmp_path / "res" / "report.html").is_file()


def test_ground_ranks_the_same_windows(planted_run):
    from wsra_dist.ground import load_model

    root = planted_run
    recs, _ = AN.read_annotations(root / "data" / "val_2.json")
    g = load_model(root / "run", "cpu")
    video = AN.C3DFeatures(root / "data" / "sub_activitynet_v1-3.c3d.hdf5").get(recs[0].video)
    res = g.ground(video, [recs[0].sentence], recs[0].duration, top_k=3)[0]
    want = benchmark_windows("activitynet", recs[0].duration)
    np.testing.assert_allclose(res["candidate_moments"], np.round(want, 3))
    assert len(res["phi"]) == 40  # the checkpoint's --resample 40 is applied to the raw C3D rows


def test_recipes_carry_the_cross_video_variant():
    from wsra_dist.config import load_recipe

    for name in ("activitynet_c3d.yaml", "planted_activitynet.yaml"):
        r = load_recipe(ROOT / "recipes" / name)
        assert (r.loss.w_cross, r.optim.lr, r.optim.name) == (1.0, 0.001, "adam"), name
        assert r.data.val_shards.endswith("val_1") and r.data.test_shards.endswith("val_2")

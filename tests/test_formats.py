"""moment_detr / lighthouse prediction lines: scored exactly like the native lines, converted both ways,
detected by their keys, refused with the file and line; written by `evaluate --checkpoint` and carried by
`ground --json`."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from wsra_dist.data import charades, didemo
from wsra_dist.data.records import DataError
from wsra_dist.evaluation import formats as F
from wsra_dist.evaluation.runner import evaluate_checkpoints, evaluate_predictions
from wsra_dist.geometry import DIDEMO_CANDIDATES, proportional_windows

from .helpers import SHARED, requires_shared

ROOT = Path(__file__).resolve().parents[1]
FULL = [list(c) for c in DIDEMO_CANDIDATES]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _scored(metrics_file: Path) -> dict:
    """metrics.json without the settings that name the prediction file."""
    m = json.loads(metrics_file.read_text())
    m["settings"] = {k: v for k, v in m["settings"].items() if k != "predictions"}
    return m


# ------------------------------------------------------------------------------ hand-made annotations
def _didemo_annotations(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        segs = rng.choice([5, 6])
        cands = [c for c in DIDEMO_CANDIDATES if c[1] < segs]
        times = [list(rng.choice(cands))] * 3 + [list(rng.choice(cands))]  # mostly agreeing annotators
        recs.append({"annotation_id": 1000 + 3 * i, "description": f"someone does thing {i}.",
                     "video": f"vid{i // 2}.mov", "num_segments": segs, "times": times})
    path.write_text(json.dumps(recs))
    return path


def _charades_annotations(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    durs = {f"V{k:02d}": round(rng.uniform(12, 40), 2) for k in range(8)}
    lines = []
    for k, (vid, d) in enumerate(durs.items()):
        for j in range(4):
            s = round(rng.uniform(0, d * 0.6), 1)
            lines.append(f"{vid} {s} {round(min(s + rng.uniform(2, 12), d + 1.5), 1)}##person does {k} {j}.")
    lines[5] = lines[5].split()[0] + " 9.0 9.0##a line the clamp rule drops (start >= end)."
    ann = folder / "charades_sta_test.txt"
    ann.write_text("\n".join(lines) + "\n")
    csv = folder / "Charades_v1_test.csv"
    csv.write_text("id,length\n" + "".join(f"{v},{d}\n" for v, d in durs.items()))
    return ann, csv


def _didemo_native(recs, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for r in recs:
        rk = FULL[:]
        rng.shuffle(rk)
        if rng.random() < 0.3:  # a share of queries ranked right, so the metrics are not all chance
            rk.remove(list(r.times[0]))
            rk.insert(0, list(r.times[0]))
        rows.append({"annotation_id": r.query_id, "moments": rk})
    return rows


def _charades_native(recs, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for r in recs:
        wins = [[round(float(s), 4), round(float(e), 4)] for s, e in proportional_windows(r.duration)]
        rng.shuffle(wins)
        rows.append({"query_id": r.query_id, "video": r.video, "moments": wins[:rng.randint(1, 12)]})
    return rows


def _as_md(rows, proto: str, recs, with_scores: bool = True) -> list[dict]:
    text = {r.query_id: r.sentence for r in recs}
    out = []
    for p in rows:
        md = F.to_md(p, proto, query=text[p[F.protocol(proto).id_key]])
        if not with_scores:  # scores are not used for ranking: any values, only the order counts
            md["pred_relevant_windows"] = [[s, e, 0.5] for s, e, _ in md["pred_relevant_windows"]]
        out.append(md)
    return out


def _both_formats_score_alike(tmp_path, proto, native, md, annotations, **kw):
    n = _jsonl(tmp_path / "native.jsonl", native)
    m = _jsonl(tmp_path / "md.jsonl", md)
    a, _ = evaluate_predictions(n, annotations, proto, tmp_path / "a", **kw)
    b, _ = evaluate_predictions(m, annotations, proto, tmp_path / "b", **kw)
    assert a == b
    assert _scored(tmp_path / "a" / "metrics.json") == _scored(tmp_path / "b" / "metrics.json")
    return a


def test_didemo_both_formats_give_identical_metrics(tmp_path):
    ann = _didemo_annotations(tmp_path / "test_data.json")
    recs = didemo.read_annotations(ann)
    native = _didemo_native(recs)
    md = _as_md(native, "didemo", recs)
    assert all(w[0] % 5 == 0 and w[1] % 5 == 0 for row in md for w in row["pred_relevant_windows"])
    m = _both_formats_score_alike(tmp_path, "didemo", native, md, ann)
    assert 10 < m["R@1"] < 100
    (tmp_path / "c").mkdir()
    _both_formats_score_alike(tmp_path / "c", "didemo", native, _as_md(native, "didemo", recs, with_scores=False), ann)


def test_charades_both_formats_give_identical_metrics(tmp_path):
    ann, dur = _charades_annotations(tmp_path)
    recs, stats = charades.read_annotations(ann, charades.read_durations(dur), "clamp")
    assert stats["dropped_start_ge_end"] == 1 and 5 not in {r.query_id for r in recs}  # qid = line number, gap
    native = _charades_native(recs)
    md = _as_md(native, "charades", recs)
    assert md[6]["qid"] == 7 and md[6]["vid"] == recs[6].video
    for strict in (False, True):
        (tmp_path / str(strict)).mkdir()
        m = _both_formats_score_alike(tmp_path / str(strict), "charades", native, md, ann, durations=str(dur),
                                      strict=strict, nms=0.5 if strict else None)
        assert 0 < m["R@5,IoU=0.3"] <= 100


@requires_shared
def test_real_didemo_annotations_both_formats_identical(tmp_path):
    ann = SHARED / "didemo" / "val_data.json"
    recs = didemo.read_annotations(ann)
    native = _didemo_native(recs, seed=3)
    m = _both_formats_score_alike(tmp_path, "didemo", native, _as_md(native, "didemo", recs), ann)
    assert m["R@5"] > 20


@requires_shared
def test_real_charades_annotations_both_formats_identical(tmp_path):
    ann, dur = SHARED / "charades-sta" / "charades_sta_test.txt", SHARED / "charades-sta" / "Charades_v1_test.csv"
    recs, _ = charades.read_annotations(ann, charades.read_durations(dur), "clamp")
    native = _charades_native(recs, seed=3)
    m = _both_formats_score_alike(tmp_path, "charades", native, _as_md(native, "charades", recs), ann,
                                  durations=str(dur))
    assert m["R@5,IoU=0.3"] > 10


# ------------------------------------------------------------------------------ conversion and detection
def test_didemo_candidates_and_windows_map_one_to_one():
    p = F.protocol("didemo")
    for s, e in DIDEMO_CANDIDATES:
        start, end = p.to_window((s, e))
        assert (start, end) == (5.0 * s, 5.0 * (e + 1))
        assert p.from_window(start, end) == [s, e]
        assert p.from_window(start + 4e-7, end - 4e-7) == [s, e]  # float noise
    for start, end in ([2.5, 10.0], [0.0, 10.001], [0.0, 35.0], [10.0, 5.0], [float("nan"), 5.0], [-5.0, 5.0]):
        with pytest.raises(ValueError):
            p.from_window(start, end)


@pytest.mark.parametrize("proto", ["didemo", "charades"])
def test_round_trip_native_md_native(proto):
    rng = random.Random(1)
    if proto == "didemo":
        rows = [{"annotation_id": i, "moments": rng.sample(FULL, 21)} for i in range(5)]
    else:
        rows = [{"query_id": i, "video": f"V{i}", "moments": [[round(rng.uniform(0, 9), 4), 10.0 + i]
                                                               for _ in range(4)]} for i in range(5)]
    for p in rows:
        p["scores"] = sorted((rng.random() for _ in p["moments"]), reverse=True)
        md = F.to_md(p, proto, query="a sentence")
        assert list(md) == ["qid", "query", "vid", "pred_relevant_windows"]
        assert [w[2] for w in md["pred_relevant_windows"]] == p["scores"]  # the model's scores, best first
        back, why = F.from_md(json.loads(json.dumps(md)), proto)
        assert why is None and back == {**p, "query": "a sentence"}
        # no (or unusable) scores: decreasing rank-based ones, the same ranking
        for scores in (None, p["scores"][::-1], [float("nan")] * len(p["moments"])):
            md = F.to_md({**p, "scores": scores}, proto)
            sc = [w[2] for w in md["pred_relevant_windows"]]
            assert sc == F.rank_scores(len(p["moments"])) and all(a > b for a, b in zip(sc, sc[1:]))
            assert F.from_md(md, proto)[0]["moments"] == p["moments"]


@pytest.mark.parametrize("proto", ["didemo", "charades"])
def test_detection_by_keys(proto):
    idk = F.protocol(proto).id_key
    assert F.detect({idk: 1, "moments": [[0, 0]]}, proto) == F.NATIVE
    assert F.detect({"qid": 1, "query": "x", "vid": "v", "pred_relevant_windows": [[0, 5, 1]]}, proto) == F.MOMENT_DETR
    assert F.detect({"qid": 1}, proto) == F.MOMENT_DETR  # then refused as missing a key
    with pytest.raises(DataError, match="both formats"):
        F.detect({"qid": 1, "moments": [[0, 0]]}, proto)
    with pytest.raises(DataError, match="needs keys"):
        F.detect({"query": "x", "vid": "v"}, proto)
    with pytest.raises(DataError, match="not a JSON object"):
        F.detect([1, 2], proto)


# ------------------------------------------------------------------------------ refusals name the file and line
@pytest.fixture
def didemo_case(tmp_path):
    ann = _didemo_annotations(tmp_path / "test_data.json", n=12)
    recs = didemo.read_annotations(ann)
    return ann, recs, _as_md(_didemo_native(recs), "didemo", recs)


def _refused(tmp_path, rows, ann, proto="didemo", **kw) -> str:
    path = _jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError) as e:
        evaluate_predictions(path, ann, proto, tmp_path / "out", **kw)
    assert str(path) in str(e.value), str(e.value)
    assert not (tmp_path / "out" / "metrics.json").exists()
    return str(e.value)


def test_mixed_formats_refused_with_line(tmp_path, didemo_case):
    ann, recs, md = didemo_case
    rows = md[:3] + [{"annotation_id": recs[3].query_id, "moments": FULL}] + md[4:]
    msg = _refused(tmp_path, rows, ann)
    assert "line 4:" in msg and "line 1 is moment_detr" in msg and "one format" in msg
    rows = [{"annotation_id": r.query_id, "moments": FULL} for r in recs[:2]] + md[2:]
    assert "line 3:" in _refused(tmp_path, rows, ann)


@pytest.mark.parametrize("window, why", [([2.5, 10.0, 0.9], "5-second grid"), ([0.0, 35.0, 0.9], "21 candidates"),
                                          ([10.0, 5.0, 0.9], "21 candidates")])
def test_off_grid_didemo_window_refused_with_line(tmp_path, didemo_case, window, why):
    ann, recs, md = didemo_case
    md[4]["pred_relevant_windows"][7] = window
    msg = _refused(tmp_path, md, ann)
    assert f"line 5 (qid {recs[4].query_id})" in msg and why in msg and "window 8" in msg
    md[4]["pred_relevant_windows"][7] = [5.0 * 3, 5.0 * 4, 0.1]  # on the grid but a repeated candidate
    md[4]["pred_relevant_windows"][8] = [5.0 * 3, 5.0 * 4, 0.1]
    assert "line 5 (qid" in _refused(tmp_path, md, ann)


def test_unknown_and_duplicate_qid_refused_with_line(tmp_path, didemo_case):
    ann, recs, md = didemo_case
    msg = _refused(tmp_path, md + [{**md[0], "qid": 999999}], ann)
    assert "name no annotated query" in msg and "999999" in msg and f"line {len(md) + 1})" in msg
    msg = _refused(tmp_path, md[:6] + [md[2]] + md[6:], ann)
    assert "more than once" in msg and f"annotation_id {recs[2].query_id}" in msg and "lines 3, 7" in msg
    with pytest.raises(DataError, match=rf"have no prediction \(e.g. annotation_id {recs[0].query_id}\)"):
        evaluate_predictions(_jsonl(tmp_path / "q.jsonl", md[1:]), ann, "didemo", tmp_path / "q")  # no line to name


@pytest.mark.parametrize("drop, what", [("pred_relevant_windows", "'pred_relevant_windows' is missing"),
                                        ("qid", "'qid' is missing")])
def test_missing_key_refused_with_line(tmp_path, didemo_case, drop, what):
    ann, recs, md = didemo_case
    md[2] = {k: v for k, v in md[2].items() if k != drop}
    msg = _refused(tmp_path, md, ann)
    assert "line 3:" in msg and what in msg
    md[2] = {"query": "x", "vid": "y"}
    assert "line 3: needs keys" in _refused(tmp_path, md, ann)


@pytest.mark.parametrize("bad, what", [({"qid": "7"}, "qid must be an integer"),
                                       ({"pred_relevant_windows": [[0.0, 5.0]]}, "[start, end, score]"),
                                       ({"pred_relevant_windows": []}, "non-empty"),
                                       ({"vid": 3}, "'vid' must be a string")])
def test_malformed_md_lines_refused_with_line(tmp_path, didemo_case, bad, what):
    ann, recs, md = didemo_case
    md[1] = {**md[1], **bad}
    msg = _refused(tmp_path, md, ann)
    assert "line 2:" in msg and what in msg


def test_vid_that_disagrees_with_the_annotation_refused_with_line(tmp_path, didemo_case):
    ann, recs, md = didemo_case
    md[5]["vid"] = "someone_else.mov"
    msg = _refused(tmp_path, md, ann)
    assert "line 6" in msg and "someone_else.mov" in msg and recs[5].video in msg
    md[5]["vid"] = ""  # an empty or absent vid is not checked
    evaluate_predictions(_jsonl(tmp_path / "ok.jsonl", md), ann, "didemo", tmp_path / "ok")


def test_charades_md_invalid_windows_refused_like_native(tmp_path):
    ann, dur = _charades_annotations(tmp_path)
    recs, _ = charades.read_annotations(ann, charades.read_durations(dur), "clamp")
    md = _as_md(_charades_native(recs), "charades", recs)
    md[3]["pred_relevant_windows"][0] = [6.0, 2.0, 0.9]
    msg = _refused(tmp_path, md, ann, "charades", durations=str(dur))
    assert "line 4 (qid" in msg and "end < start" in msg
    md[3]["pred_relevant_windows"][0] = [2.0, recs[3].duration + 5, 0.9]  # past the end: needs the durations
    msg = _refused(tmp_path, md, ann, "charades", durations=str(dur))
    assert "line 4" in msg and "after the video's duration" in msg


def test_cli_refuses_a_mixed_file_in_one_line(tmp_path, didemo_case):
    ann, recs, md = didemo_case
    path = _jsonl(tmp_path / "p.jsonl", md[:2] + [{"annotation_id": recs[2].query_id, "moments": FULL}])
    p = subprocess.run([sys.executable, "-m", "wsra_dist.cli", "evaluate", "--predictions", str(path),
                        "--annotations", str(ann), "--protocol", "didemo", "--out", str(tmp_path / "r")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = p.stdout + p.stderr
    assert p.returncode == 2 and f"{path}: line 3:" in err and "Traceback" not in err, err


# ------------------------------------------------------------------------------ checkpoint and ground
def test_checkpoint_writes_md_predictions_that_score_identically(trained_didemo, tmp_path):
    run, shards = trained_didemo / "run", trained_didemo / "shards" / "test"
    ann = trained_didemo / "data" / "test_data.json"
    evaluate_checkpoints([str(run)], [str(shards)], "didemo", tmp_path / "ck", device="cpu")
    native = [json.loads(l) for l in (tmp_path / "ck" / "predictions.jsonl").read_text().splitlines()]
    md = [json.loads(l) for l in (tmp_path / "ck" / "predictions_md.jsonl").read_text().splitlines()]
    recs = {r.query_id: r for r in didemo.read_annotations(ann)}
    assert len(md) == len(native) == len(recs)
    for n, m in zip(native, md):
        assert list(m) == ["qid", "query", "vid", "pred_relevant_windows"] and m["qid"] == n["annotation_id"]
        r = recs[m["qid"]]
        assert m["query"] == r.sentence and m["vid"] == r.video
        assert [w[2] for w in m["pred_relevant_windows"]] == n["scores"]  # the model's own scores
        assert [[int(s // 5), int(e // 5) - 1] for s, e, _ in m["pred_relevant_windows"]] == n["moments"]
    ref = json.loads((tmp_path / "ck" / "metrics.json").read_text())
    for name in ("predictions.jsonl", "predictions_md.jsonl"):
        evaluate_predictions(tmp_path / "ck" / name, ann, "didemo", tmp_path / name)
        got = json.loads((tmp_path / name / "metrics.json").read_text())
        assert {k: got[k] for k in ("R@1", "R@5", "mIoU", "num_queries")} == \
               {k: ref[k] for k in ("R@1", "R@5", "mIoU", "num_queries")}


def test_ground_json_carries_pred_relevant_windows(trained_didemo):
    vid = json.loads((trained_didemo / "data" / "test_data.json").read_text())[0]["video"]
    feats = f"{trained_didemo / 'data' / 'average_global_flow.h5'}:{vid}"
    p = subprocess.run([sys.executable, "-m", "wsra_dist.cli", "ground", "--checkpoint", str(trained_didemo / "run"),
                        "--features", feats, "--query", "a man opens the door.", "--query", "someone waves.",
                        "--top-k", "4", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    results = json.loads(p.stdout)["results"]
    assert len(results) == 2
    for r in results:
        w = r["pred_relevant_windows"]
        assert len(w) == 4 and w == [[s, e, sc] for (s, e), sc in zip(r["moments"], r["scores"])]
        assert [x[2] for x in w] == sorted((x[2] for x in w), reverse=True)  # best first
        assert all(F.protocol("didemo").from_window(s, e) in FULL for s, e, _ in w)  # seconds on DiDeMo's grid

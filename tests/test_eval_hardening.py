"""Evaluation refuses what the official protocols cannot score: incomplete or invalid DiDeMo rankings,
Charades-STA moments that are reversed, non-finite or outside the video; the IoU comparison is the
official plain >= unless a tolerance is asked for."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from wsra_dist.data import charades, didemo
from wsra_dist.data.records import DataError
from wsra_dist.evaluation import metrics as M
from wsra_dist.geometry import DIDEMO_CANDIDATES, proportional_windows
from wsra_dist.evaluation.runner import evaluate_predictions
from wsra_dist.evaluation.scoring import read_predictions, read_predictions_located, score_charades, score_didemo

from .helpers import SHARED, requires_shared, run_cli

ROOT = Path(__file__).resolve().parents[1]
FULL = [list(c) for c in DIDEMO_CANDIDATES]


def _cli(*args):
    return run_cli(*args, check=False)


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ DiDeMo rankings
def _bad_rankings():
    rng = random.Random(3)
    out = {
        "top-5 list": FULL[:5],
        "top-1 list": FULL[:1],
        "20 of 21": FULL[1:],
        "pair past chunk 5 [0, 7]": [[0, 7]] + FULL[1:],
        "reversed pair [4, 2]": FULL[:-1] + [[4, 2]],
        "negative chunk": [[-1, 0]] + FULL[1:],
        "duplicate pair replacing one": FULL[:-1] + [FULL[0]],
        "full ranking plus a duplicate": FULL + [FULL[3]],
        "full ranking plus an invalid pair": FULL + [[2, 9]],
        "float chunks": [[float(s), float(e)] for s, e in FULL],
        "bool chunks": [[True, True]] + FULL[1:],
        "triples": [[s, e, 0] for s, e in FULL],
        "empty": [],
    }
    shuffled = FULL[:]
    rng.shuffle(shuffled)
    out["shuffled, one swapped for a duplicate"] = shuffled[:-1] + [shuffled[0]]
    return out


BAD = _bad_rankings()


@pytest.mark.parametrize("name", sorted(BAD))
def test_didemo_score_refuses_anything_but_a_permutation_of_the_21_candidates(name):
    truth = [{"query_id": 11, "times": [[0, 0]] * 4}, {"query_id": 42, "times": [[1, 1]] * 4}]
    preds = [{"annotation_id": 11, "moments": FULL}, {"annotation_id": 42, "moments": BAD[name]}]
    with pytest.raises(DataError, match=r"annotation_id 42\b") as e:
        score_didemo(preds, truth)
    assert "annotation_id 11" not in str(e.value) and "21 candidates" in str(e.value)
    assert M.didemo_ranking_problem(BAD[name]) is not None
    with pytest.raises(DataError):  # the pure metric refuses too
        M.didemo_metrics([FULL, BAD[name]], [t["times"] for t in truth])


def test_didemo_any_permutation_is_accepted_and_order_free():
    rng = random.Random(0)
    truth = [{"query_id": i, "times": [[2, 3]] * 4} for i in range(30)]
    preds = []
    for i in range(30):
        r = FULL[:]
        rng.shuffle(r)
        preds.append({"annotation_id": i, "moments": [tuple(m) for m in r] if i % 2 else r})
    m = score_didemo(preds, truth)  # lists and tuples, numpy-free, any order
    assert 0 <= m["R@1"] <= 100
    preds[0]["moments"] = [[2, 3]] + [c for c in FULL if c != [2, 3]]
    assert M.didemo_query(preds[0]["moments"], [[2, 3]] * 4) == (1.0, 1.0)
    # numpy integer pairs (as a checkpoint could produce) are candidates too
    assert M.didemo_ranking_problem(np.asarray(FULL, dtype=np.int64)) is None


def test_didemo_refusal_names_a_few_ids_and_the_count():
    truth = [{"query_id": i, "times": [[0, 0]] * 4} for i in range(10)]
    preds = [{"annotation_id": i, "moments": FULL[:5] if i >= 3 else FULL} for i in range(10)]
    with pytest.raises(DataError, match=r"7 of 10 DiDeMo rankings") as e:
        score_didemo(preds, truth)
    msg = str(e.value)
    assert "annotation_id 3" in msg and "annotation_id 5" in msg and "annotation_id 9" not in msg  # a few, not all


def test_didemo_prediction_file_refusal_names_file_and_line(tmp_path):
    rows = [{"annotation_id": 1, "moments": FULL}, {"annotation_id": 2, "moments": FULL},
            {"annotation_id": 3, "moments": [[0, 7]] + FULL[1:]}, {"annotation_id": 4, "moments": FULL[:5]}]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError) as e:
        read_predictions(path, "didemo")
    msg = str(e.value)
    assert str(path) in msg and "line 3" in msg and "annotation_id 3" in msg and "[0, 7]" in msg
    assert "line 4" in msg and "annotation_id 4" in msg and "line 1 " not in msg


@requires_shared
def test_didemo_real_annotations_full_rankings_pass_truncated_refused(tmp_path):
    ann = SHARED / "didemo" / "val_data.json"
    recs = didemo.read_annotations(ann)
    rng = random.Random(1)
    rows = []
    for r in recs:
        rk = FULL[:]
        rng.shuffle(rk)
        rows.append({"annotation_id": r.query_id, "moments": rk})
    good = _jsonl(tmp_path / "good.jsonl", rows)
    truth = [{"query_id": r.query_id, "times": r.times} for r in recs]
    m = score_didemo(read_predictions(good, "didemo"), truth)
    assert 0 < m["R@1"] < 10  # a random full ranking: chance level (3.6 % expected)
    # Truncated to the top 5: refused, naming the file, the first lines and their ids (never scored).
    trunc = _jsonl(tmp_path / "top5.jsonl", [{**r, "moments": r["moments"][:5]} for r in rows])
    with pytest.raises(DataError) as e:
        read_predictions(trunc, "didemo")
    msg = str(e.value)
    assert f"{len(rows)} DiDeMo rankings" in msg and "line 1 " in msg and str(recs[0].query_id) in msg
    with pytest.raises(DataError, match="not a full ranking"):
        score_didemo([{**r, "moments": r["moments"][:5]} for r in rows], truth)
    # One bad line among the real ids: the CLI prints one clean line naming it and exits 2.
    lines = good.read_text().splitlines()
    lines[6] = json.dumps({"annotation_id": recs[6].query_id, "moments": FULL[:-1] + [[4, 2]]})
    (tmp_path / "one_bad.jsonl").write_text("\n".join(lines) + "\n")
    p = _cli("evaluate", "--predictions", tmp_path / "one_bad.jsonl", "--annotations", ann, "--protocol", "didemo",
             "--out", tmp_path / "res")
    err = p.stdout + p.stderr
    assert p.returncode == 2, err
    assert "line 7" in err and str(recs[6].query_id) in err and "[4, 2]" in err and "Traceback" not in err
    assert not (tmp_path / "res" / "metrics.json").exists()


# ------------------------------------------------------------------------------ Charades-STA moments
TRUTH = [{"query_id": 0, "times": [[2.0, 8.0]], "duration": 20.0},
         {"query_id": 1, "times": [[0.0, 5.0]], "duration": 10.0}]


@pytest.mark.parametrize("bad, what", [
    ([[8.0, 2.0]], "end < start"),
    ([[0.0, 4.0], [6.0, 5.9]], "end < start"),  # not only the top-1
    ([[float("nan"), 4.0]], "NaN"),
    ([[0.0, float("nan")]], "NaN"),
    ([[0.0, float("inf")]], "NaN/inf"),
    ([[float("-inf"), 3.0]], "NaN/inf"),
    ([[-0.5, 3.0]], "before 0"),
    ([[0.0, 10.5]], "after the video's duration"),
    ([[11.0, 12.0]], "after the video's duration"),
    ([[0.0, 4.0], [0.0, 10.01]], "after the video's duration"),
    ([["0", 4.0]], "numbers"),
    ([[None, 4.0]], "numbers"),
    ([[True, 4.0]], "numbers"),
    ([[0.0, 4.0, 5.0]], "pair"),
    ([], "non-empty"),
])
def test_charades_invalid_moments_are_refused_naming_the_query(bad, what):
    preds = [{"query_id": 0, "moments": [[2.0, 8.0]]}, {"query_id": 1, "moments": bad}]
    with pytest.raises(DataError, match=r"query_id 1\b") as e:
        score_charades(preds, TRUTH)
    assert what in str(e.value) and "query_id 0" not in str(e.value)


def test_charades_valid_edge_moments_are_scored():
    # zero-length moments, the whole video, and ends within float/rounding tolerance of the duration
    preds = [{"query_id": 0, "moments": [[2.0, 8.0], [3.0, 3.0], [0.0, 20.0]]},
             {"query_id": 1, "moments": [[0.0, 5.0], [10.0, 10.0], [0.0, 10.0 + 5e-5], [-5e-5, 1.0]]}]
    m = score_charades(preds, TRUTH)
    assert m["R@1,IoU=0.7"] == 100.0 and m["mIoU"] == pytest.approx(100.0)
    # a checkpoint writes proportional windows rounded to 4 decimals: accepted for any duration
    for dur in (7.38, 16.62, 30.0, 31.29, 12.345678, 99.99999):
        wins = [[round(float(s), 4), round(float(e), 4)] for s, e in proportional_windows(dur)]
        assert M.charades_moment_problem(wins, dur)[0] is None, dur


def test_charades_all_reversed_file_is_refused_unless_clipped(tmp_path):
    truth = [{"query_id": i, "times": [[1.0, 6.0]], "duration": 12.0} for i in range(5)]
    rows = [{"query_id": i, "moments": [[6.0, 1.0], [12.0, 0.0]]} for i in range(5)]
    path = _jsonl(tmp_path / "rev.jsonl", rows)
    with pytest.raises(DataError) as e:
        read_predictions(path, "charades")
    msg = str(e.value)
    assert str(path) in msg and "5 Charades-STA predictions" in msg and "line 1 " in msg and "end < start" in msg
    # opt-in: order start <= end and clip into [0, duration]
    preds, where = read_predictions_located(path, "charades", clip_predictions=True)
    assert where[3] == f"{path}: line 4"
    m = score_charades(preds, truth, clip_predictions=True)
    assert m["R@1,IoU=0.7"] == 100.0 and m["R@5,IoU=0.3"] == 100.0
    # out of range moments: clipped into the video with the option, refused (with the line) without it
    rows = [{"query_id": i, "moments": [[-3.0, 6.0], [1.0, 40.0]]} for i in range(5)]
    path = _jsonl(tmp_path / "out.jsonl", rows)
    with pytest.raises(DataError, match="before 0"):
        read_predictions(path, "charades")
    m = score_charades(read_predictions(path, "charades", clip_predictions=True), truth, clip_predictions=True)
    assert m["mIoU"] == pytest.approx(100 * 5 / 6)  # [-3, 6] -> [0, 6] against [1, 6]
    rows = [{"query_id": i, "moments": [[1.0, 6.0]] if i != 2 else [[1.0, 6.0], [5.0, 12.5]]} for i in range(5)]
    path = _jsonl(tmp_path / "late.jsonl", rows)
    preds, where = read_predictions_located(path, "charades")  # the duration is not known here ...
    with pytest.raises(DataError) as e:  # ... but the scorer names the line
        score_charades(preds, truth, where=where)
    assert f"{path}: line 3" in str(e.value) and "query_id 2" in str(e.value) and "12.5" in str(e.value)
    assert score_charades(preds, truth, clip_predictions=True)["R@1,IoU=0.7"] == 100.0


@pytest.mark.parametrize("bad", [[[float("nan"), 4.0]], [[0.0, float("inf")]], [[float("-inf"), float("nan")]]])
def test_charades_clipping_still_refuses_non_finite(tmp_path, bad):
    with pytest.raises(DataError, match="NaN/inf"):
        score_charades([{"query_id": 0, "moments": [[2.0, 8.0]]}, {"query_id": 1, "moments": bad}], TRUTH,
                       clip_predictions=True)
    # NaN / Infinity are valid JSON for Python's reader: the file check catches them with the line
    path = tmp_path / "nan.jsonl"
    path.write_text('{"query_id": 0, "moments": [[0.0, 1.0]]}\n' + json.dumps({"query_id": 1, "moments": bad}) + "\n")
    with pytest.raises(DataError, match=r"line 2 .*NaN/inf"):
        read_predictions(path, "charades", clip_predictions=True)
    with pytest.raises(DataError):  # the pure metric never scores them either
        M.charades_metrics([np.asarray(bad, dtype=float)], np.array([[0.0, 1.0]]))


@requires_shared
def test_charades_cli_refuses_reversed_and_clips_on_request(tmp_path):
    ann, dur = SHARED / "charades-sta" / "charades_sta_test.txt", SHARED / "charades-sta" / "Charades_v1_test.csv"
    recs, _ = charades.read_annotations(ann, charades.read_durations(dur), "clamp")
    path = _jsonl(tmp_path / "rev.jsonl", [{"query_id": r.query_id, "video": r.video,
                                           "moments": [r.times[0][::-1]]} for r in recs])
    args = ["evaluate", "--predictions", path, "--annotations", ann, "--durations", dur, "--protocol", "charades"]
    p = _cli(*args, "--out", tmp_path / "a")
    err = p.stdout + p.stderr
    assert p.returncode == 2 and "line 1 " in err and "end < start" in err and "Traceback" not in err, err
    p = _cli(*args, "--clip-predictions", "--out", tmp_path / "b")
    assert p.returncode == 0, p.stdout + p.stderr
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["R@1,IoU=0.7"] == 100.0 and m["settings"]["clip_predictions"] is True


# ------------------------------------------------------------------------------ IoU comparison
def test_charades_hit_is_plain_ge_by_default_tolerance_on_request():
    gt = np.array([[0.0, 10.0]])
    just_below = [np.array([[0.0, 5.0 - 1e-12]])]  # IoU 0.5 - 1e-13
    exact = [np.array([[0.0, 5.0]])]  # IoU exactly 0.5
    assert M.charades_metrics(exact, gt)["R@1,IoU=0.5"] == 100.0
    assert M.charades_metrics(just_below, gt)["R@1,IoU=0.5"] == 0.0  # official: iou >= 0.5, no tolerance
    assert M.charades_metrics(just_below, gt, iou_tolerance=1e-9)["R@1,IoU=0.5"] == 100.0
    assert M.charades_metrics(exact, gt, strict=True)["R@1,IoU=0.5"] == 0.0  # strict stays >
    assert M.charades_metrics(exact, gt, strict=True, iou_tolerance=1e-9)["R@1,IoU=0.5"] == 0.0
    just_above = [np.array([[0.0, 5.0 + 1e-12]])]
    assert M.charades_metrics(just_above, gt, strict=True)["R@1,IoU=0.5"] == 100.0
    assert M.charades_metrics(just_above, gt, strict=True, iou_tolerance=1e-9)["R@1,IoU=0.5"] == 0.0
    for bad in (-1e-9, float("nan"), float("inf"), 1.5):
        with pytest.raises(DataError, match="iou_tolerance"):
            M.charades_metrics(exact, gt, iou_tolerance=bad)
        with pytest.raises(DataError, match="iou-tolerance"):  # checked before any file is read
            evaluate_predictions("no/such.jsonl", "no/such.txt", "charades", "no/out", iou_tolerance=bad)
    # the chance / oracle rows use the same rule
    _, orc = M.charades_chance_oracle(just_below, gt)
    assert orc["R@1,IoU=0.5"] == 0.0
    _, orc = M.charades_chance_oracle(just_below, gt, iou_tolerance=1e-9)
    assert orc["R@1,IoU=0.5"] == 100.0
    # and the scorer passes it through
    truth = [{"query_id": 0, "times": [[0.0, 10.0]], "duration": 10.0}]
    preds = [{"query_id": 0, "moments": [[0.0, 5.0 - 1e-12]]}]
    assert score_charades(preds, truth)["R@1,IoU=0.5"] == 0.0
    assert score_charades(preds, truth, iou_tolerance=1e-9)["R@1,IoU=0.5"] == 100.0


def test_cli_evaluate_has_the_new_options():
    p = _cli("evaluate", "--help")
    out = " ".join(p.stdout.split())
    assert p.returncode == 0 and "--clip-predictions" in out and "--iou-tolerance" in out

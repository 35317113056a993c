"""Input files the user gives: duplicate ids with conflicting values, files that are not UTF-8, every recipe
error, the size cap of a prediction line, and prediction files scored under a defect filter.  Each refusal is
one line naming the file and the line (or the records / places); tests check those names."""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import pytest

from wsra_dist.config import ConfigError, load_recipe
from wsra_dist.data import activitynet as AN
from wsra_dist.data import charades as CH
from wsra_dist.data import didemo as DD
from wsra_dist.data.records import DataError
from wsra_dist.evaluation import scoring
from wsra_dist.evaluation.runner import evaluate_predictions

from .helpers import SHARED, requires_shared, run_cli

LATIN1 = "café".encode("latin-1")  # b'caf\xe9': the 0xe9 byte cannot start a UTF-8 sequence


def _one_line_error(p) -> str:
    err = p.stderr.strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    return err


def _charades(d: Path, csv_rows: list[str], lines: list[str]) -> tuple[Path, Path]:
    (d / "d.csv").write_text("\n".join(["id,length"] + csv_rows) + "\n")
    (d / "a.txt").write_text("\n".join(lines) + "\n")
    return d / "a.txt", d / "d.csv"


def _activitynet(entries: list[tuple[str, dict]]) -> str:
    """One JSON object line with the entries in order (a key may repeat, as a hand-merged file can)."""
    return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in entries) + "}"


def _video(duration: float, spans: list[list[float]]) -> dict:
    return {"duration": duration, "timestamps": spans, "sentences": [f"a person acts {i}." for i in range(len(spans))]}


# ------------------------------------------------------------------------------ duplicate ids
def test_durations_csv_conflicting_duplicate_is_refused_naming_both_lines(tmp_path):
    ann, dur = _charades(tmp_path, ["AAA,30.5", "BBB,12.0", "CCC,8.0", "AAA,31.0"], ["AAA 1.0 5.0##a person sits."])
    with pytest.raises(DataError) as e:
        CH.read_durations(dur)
    msg = str(e.value)
    assert msg.startswith(f"{dur}: lines 2 and 5: video 'AAA' is listed twice with different lengths (30.5 and 31 s)")
    # the same row twice is harmless
    _charades(tmp_path, ["AAA,30.5", "BBB,12.0", "AAA,30.5"], [])
    assert CH.read_durations(dur) == {"AAA": 30.5, "BBB": 12.0}
    _charades(tmp_path, ["AAA,30.5", "BBB,12.0", "AAA,31"], ["AAA 1.0 5.0##a person sits."])
    (tmp_path / "p.jsonl").write_text('{"query_id": 0, "moments": [[1.0, 5.0]]}\n')
    p = run_cli("evaluate", "--predictions", tmp_path / "p.jsonl", "--annotations", ann, "--durations", dur,
                "--protocol", "charades", "--out", tmp_path / "o", check=False)
    assert f"{dur}: lines 2 and 4: video 'AAA'" in _one_line_error(p)


def test_activitynet_video_listed_twice_is_refused_naming_both_places(tmp_path):
    f = tmp_path / "val.json"
    a, b = _video(20.0, [[1.0, 5.0]]), _video(20.0, [[1.0, 5.0]])
    f.write_text(_activitynet([("v_a", a), ("v_b", _video(9.0, [[0.0, 2.0]])), ("v_a", {**b, "duration": 25.0})]))
    with pytest.raises(DataError) as e:
        AN.read_annotations(f)
    msg = str(e.value)
    text = f.read_text()
    cols = [m.start() + 1 for m in re.finditer('"v_a"', text)]
    assert msg == (f"{f}: line 1, column {cols[0]} and line 1, column {cols[1]}: video 'v_a' is listed twice with "
                   "different entries; keep one")
    f.write_text(_activitynet([("v_a", a), ("v_b", _video(9.0, [[0.0, 2.0]])), ("v_a", b)]))  # identical: accepted
    recs, _ = AN.read_annotations(f)
    assert [r.video for r in recs] == ["v_a", "v_b"] and [r.query_id for r in recs] == [0, 1]


def test_didemo_duplicate_annotation_id_names_both_records(tmp_path):
    recs = [{"annotation_id": i, "description": "a dog runs.", "video": f"v{i}.mp4", "num_segments": 6,
             "times": [[0, 1]]} for i in range(5)]
    recs[4]["annotation_id"] = 1
    f = tmp_path / "d.json"
    f.write_text(json.dumps(recs))
    with pytest.raises(DataError, match=re.escape(f"{f}: records 1 and 4: duplicate annotation_id 1")):
        DD.read_annotations(f)


# ------------------------------------------------------------------------------ not UTF-8
def _not_utf8(kind: str, tmp_path: Path) -> tuple[Path, int, callable]:
    """A file of `kind` with a Latin-1 byte on one of its lines: (path, that line, how to read it)."""
    if kind == "charades annotations":
        f = tmp_path / "a.txt"
        f.write_bytes(b"AAA 1.0 5.0##a person sits.\nAAA 2.0 6.0##a person opens the " + LATIN1 + b" door.\n")
        return f, 2, lambda: CH.read_annotations(f, {"AAA": 30.0})
    if kind == "durations csv":
        f = tmp_path / "d.csv"
        f.write_bytes(b"id,scene,length\nAAA,Kitchen,30.0\nBBB," + LATIN1 + b",12.0\n")
        return f, 3, lambda: CH.read_durations(f)
    if kind == "didemo annotations":
        f = tmp_path / "d.json"
        rec = b'{"annotation_id": 1, "description": "a ' + LATIN1 + b'", "video": "v.mp4", "num_segments": 6, '
        f.write_bytes(b"[\n" + rec + b'"times": [[0, 1]]}\n]\n')
        return f, 2, lambda: DD.read_annotations(f)
    if kind == "activitynet annotations":
        f = tmp_path / "a.json"
        f.write_bytes(b'{"v_a": {"duration": 20.0,\n "timestamps": [[1.0, 5.0]],\n "sentences": ["' + LATIN1 + b'"]}}')
        return f, 3, lambda: AN.read_annotations(f)
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'{"query_id": 0, "moments": [[1.0, 5.0]]}\n{"query_id": 1, "query": "' + LATIN1
                  + b'", "moments": [[1.0, 5.0]]}\n')
    return f, 2, lambda: scoring.read_predictions(f, "charades")


@pytest.mark.parametrize("kind", ["charades annotations", "durations csv", "didemo annotations",
                                  "activitynet annotations", "predictions"])
def test_a_file_that_is_not_utf8_names_the_file_and_line(tmp_path, kind):
    f, line, read = _not_utf8(kind, tmp_path)
    with pytest.raises(DataError) as e:
        read()
    msg = str(e.value)
    assert msg.startswith(f"{f}: line {line}: not UTF-8 text (byte 0xe9 at byte ") and "codec" not in msg, msg


def test_not_utf8_on_the_command_line_is_one_line(tmp_path):
    f, line, _ = _not_utf8("predictions", tmp_path)
    ann, dur = _charades(tmp_path, ["AAA,30.0"], ["AAA 1.0 5.0##a person sits.", "AAA 2.0 6.0##a person runs."])
    p = run_cli("evaluate", "--predictions", f, "--annotations", ann, "--durations", dur, "--protocol", "charades",
                "--out", tmp_path / "o", check=False)
    assert f"{f}: line 2: not UTF-8 text" in _one_line_error(p)


def test_a_leading_byte_order_mark_is_accepted(tmp_path):
    ann, dur = _charades(tmp_path, ["AAA,30.0"], ["AAA 1.0 5.0##a person sits."])
    dur.write_bytes(b"\xef\xbb\xbf" + dur.read_bytes())
    ann.write_bytes(b"\xef\xbb\xbf" + ann.read_bytes())
    recs, _ = CH.read_annotations(ann, CH.read_durations(dur))
    assert recs[0].video == "AAA"


# ------------------------------------------------------------------------------ recipes
RECIPES = {  # name: (text, line the message must name, what it must say)
    "top-level list": ("- train\n- model\n", 1, "a recipe is a mapping of keys"),
    "top-level scalar": ("just a word\n", 1, "got a YAML single value"),
    "tab": ("name: x\ntrain:\n  epochs: 3\n\tbatch_size: 2\n", 4, "a tab character (YAML indents with spaces"),
    "unclosed list": ("name: x\ntrain: [1, 2\nseed: 3\n", 3, "invalid YAML"),
    "bad nesting": ("name: x\nseed: 1: 2\n", 2, "mapping values are not allowed here"),
    "two documents": ("name: x\n---\nseed: 2\n", 2, "expected a single document"),
    "section not a mapping": ("name: x\ntrain: 5\n", 2, "train: expected a mapping of epochs"),
    "section a list": ("name: x\n\noptim: [adam]\n", 3, "optim: expected a mapping of name, lr"),
    "section twice": ("train:\n  epochs: 3\nseed: 1\ntrain:\n  batch_size: 4\n", 1,
                      "train is given twice with different values"),
    "unknown key": ("name: x\ntrain:\n  epokhs: 3\n", 3, "unknown recipe key 'train.epokhs'"),
    "wrong type": ("name: x\ntrain:\n  epochs: many\n", 3, "train.epochs: expected an integer"),
    "invalid value": ("name: x\noptim:\n  lr: -1\n", 3, "optim.lr must be a number > 0"),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_error_is_one_line_naming_file_and_line(tmp_path, name):
    text, line, what = RECIPES[name]
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_recipe(f)
    msg = str(e.value)
    assert re.match(re.escape(f"{f}: line{'s' if name == 'section twice' else ''} {line}") + r"\b", msg), msg
    assert what in msg and "\n" not in msg, msg


def test_recipe_errors_on_the_command_line(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_bytes(b"name: " + LATIN1 + b"\n")
    with pytest.raises(ConfigError, match=re.escape(f"{f}: line 1: not UTF-8 text")):
        load_recipe(f)
    f.write_text(RECIPES["tab"][0])
    p = run_cli("train", f, check=False)
    assert f"{f}: line 4, column 1: invalid YAML: a tab character" in _one_line_error(p)
    f.write_text(RECIPES["top-level list"][0])
    err = _one_line_error(run_cli("train", f, check=False))
    assert f"{f}: line 1: a recipe is a mapping" in err and "internal error" not in err
    # a value given by an override is not blamed on the file's line
    f.write_text("name: x\noptim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(f, ["optim.lr=-1"])
    assert str(e.value).startswith("optim.lr must be")
    with pytest.raises(ConfigError, match=r"override 'train.epochs=\[1': the value is not valid YAML"):
        load_recipe(f, ["train.epochs=[1"])


# ------------------------------------------------------------------------------ prediction line cap
def test_prediction_line_cap_is_stated_in_help_and_enforced_with_bounded_memory(tmp_path):
    p = run_cli("evaluate", "--help")
    assert f"{scoring.MAX_LINE_BYTES:,} bytes" in " ".join(p.stdout.split())
    f = tmp_path / "p.jsonl"
    big = 40 * scoring.MAX_LINE_BYTES  # 40 MiB on one line: read line by line, never held whole
    with f.open("w") as out:
        out.write('{"query_id": 0, "moments": [[1.0, 5.0]]}\n')
        out.write('{"query_id": 1, "query": "' + "x" * big + '", "moments": [[1.0, 5.0]]}\n')
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as e:
            scoring.read_predictions(f, "charades")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value).startswith(f"{f}: line 2: longer than {scoring.MAX_LINE_BYTES:,} bytes")
    assert peak < 4 * scoring.MAX_LINE_BYTES, peak  # about one capped read, not the 40 MiB line
    # a line just under the cap is read as usual
    pad = scoring.MAX_LINE_BYTES - len('{"query_id": 1, "query": "", "moments": [[1.0, 5.0]]}\n')
    f.write_text('{"query_id": 1, "query": "' + "x" * pad + '", "moments": [[1.0, 5.0]]}\n')
    assert len(f.read_bytes()) == scoring.MAX_LINE_BYTES and len(scoring.read_predictions(f, "charades")) == 1


# ------------------------------------------------------------------------------ filters and predictions
def _activitynet_split(tmp_path: Path) -> Path:
    """Three videos; under strict, sentence 1 (end past the duration) and 4 (start >= end) are dropped; under
    clamp only 4."""
    f = tmp_path / "val_2.json"
    f.write_text(_activitynet([("v_a", _video(20.0, [[1.0, 5.0], [10.0, 21.5]])),
                               ("v_b", _video(30.0, [[0.0, 30.0], [2.0, 8.0], [6.0, 6.0]])),
                               ("v_c", _video(10.0, [[3.0, 7.0]]))]))
    return f


def _predictions(tmp_path: Path, ids: list[int]) -> Path:
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"query_id": q, "moments": [[1.0, 5.0], [0.0, 10.0]]}) + "\n" for q in ids))
    return f


def test_predictions_of_filtered_queries_are_skipped_with_one_warning(tmp_path, capsys):
    ann = _activitynet_split(tmp_path)
    preds = _predictions(tmp_path, [0, 1, 2, 3, 4, 5])  # every sentence of the file
    m, _ = evaluate_predictions(preds, ann, "activitynet", tmp_path / "o", activitynet_filter="strict")
    err = capsys.readouterr().err
    warnings = [l for l in err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1, err
    assert warnings[0] == (f"warning: 2 predictions are for queries that --activitynet-filter strict drops from {ann} "
                           f"(1 end past the video's length, 1 start >= end); they are skipped, not scored (e.g. "
                           f"query_id 1 ({preds}: line 2), query_id 4 ({preds}: line 5))")
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["num_queries"] == 4 and metrics["settings"]["skipped_predictions"]["count"] == 2
    # clamp keeps sentence 1 (clipped): only sentence 4 is skipped
    evaluate_predictions(preds, ann, "activitynet", tmp_path / "o2", activitynet_filter="clamp")
    assert "1 predictions are for queries that --activitynet-filter clamp drops" in capsys.readouterr().err
    # an id the annotation file does not hold at all is still refused as unknown
    preds = _predictions(tmp_path, [0, 1, 2, 3, 4, 5, 6])
    with pytest.raises(DataError, match=r"1 predictions name no annotated query \(e\.g\. query_id 6 \("):
        evaluate_predictions(preds, ann, "activitynet", tmp_path / "o3", activitynet_filter="strict")
    assert "warning" not in capsys.readouterr().err  # the refusal stays the one line


def test_charades_filter_skips_what_it_drops(tmp_path):
    ann, dur = _charades(tmp_path, ["AAA,20.0", "BBB,10.0"],
                         ["AAA 1.0 5.0##a person sits.", "AAA 12.0 22.5##a person runs.",
                          "BBB 4.0 4.0##a person waits.", "BBB 2.0 6.0##a person eats."])
    preds = _predictions(tmp_path, [0, 1, 2, 3])
    p = run_cli("evaluate", "--predictions", preds, "--annotations", ann, "--durations", dur, "--protocol", "charades",
                "--charades-filter", "strict", "--out", tmp_path / "o", check=False)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("warning:") == 1 and "2 predictions are for queries that --charades-filter strict drops" in p.stderr
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["num_queries"] == 2


@requires_shared
def test_full_charades_prediction_file_under_strict(tmp_path):
    ann, dur = SHARED / "charades-sta" / "charades_sta_test.txt", SHARED / "charades-sta" / "Charades_v1_test.csv"
    recs, _ = CH.read_annotations(ann, CH.read_durations(dur), "clamp")  # every query of the file (3,720)
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"query_id": r.query_id, "moments": [r.times[0]]}) + "\n" for r in recs))
    p = run_cli("evaluate", "--predictions", preds, "--annotations", ann, "--durations", dur, "--protocol", "charades",
                "--charades-filter", "strict", "--out", tmp_path / "o", check=False)
    assert p.returncode == 0, p.stderr
    assert "warning: 562 predictions are for queries that --charades-filter strict drops" in p.stderr
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["num_queries"] == 3158

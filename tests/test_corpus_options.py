"""`evaluate --corpus` applies every option it is given or refuses it in one line; a prediction file's report
has the prior row when training annotations are given, and a caption that explains only the rows it has."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from wsra_dist.data.records import DataError



def _invoke(*args):
    from wsra_dist.cli import app

    return CliRunner().invoke(app, ["evaluate", "--corpus", *map(str, args)])


def _refused(res, want: str) -> str:
    assert res.exit_code != 0 and isinstance(res.exception, DataError), (res.output, res.exception)
    msg = str(res.exception)
    assert want in msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("extra,want", [
    (["--nms", "0.5"], "--nms does not apply to --corpus"),
    (["--strict-iou"], "--strict-iou does not apply"),
    (["--iou-tolerance", "0.1"], "--iou-tolerance does not apply"),
    (["--fusion-weights", "1"], "--fusion-weights does not apply"),
    (["--clip-predictions"], "--clip-predictions does not apply"),
    (["--charades-filter", "strict"], "--charades-filter does not apply"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--train-durations", "x.csv"], "--train-durations goes with --train-annotations"),
    (["--chunk-consistency", "-1"], "--chunk-consistency"),
    (["--contrast-weight", "0.5"], "--contrast-weight is a parameter of the contrast ranking, which ranks windows over "
                                   "snippets"),
    (["--span-threshold", "-0.3"], "--span-threshold does not apply to --corpus"),
    (["--scale-calibration", "span"], "--scale-calibration span ranks windows over snippets (Charades-STA, ActivityNet)"),
])
def test_checkpoint_options_that_do_not_apply_are_refused(corpus_run, tmp_path, extra, want):
    root = corpus_run[0]
    res = _invoke("--checkpoint", root / "run", "--shards", root / "shards" / "test", "--protocol", "didemo",
                  "--out", tmp_path / "ev", *extra)
    _refused(res, want)
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("flag,value", [("--chunk-consistency", "0"), ("--scale-calibration", "none"),
                                        ("--contrast-weight", "2"), ("--batch-size", "8")])
def test_prediction_files_refuse_reranking_options(corpus_run, tmp_path, flag, value):
    root, out, _, _ = corpus_run
    res = _invoke("--predictions", out / "predictions_corpus.jsonl", "--shards", root / "shards" / "test",
                  "--protocol", "didemo", "--out", tmp_path / "ev", flag, value)
    _refused(res, f"{flag} ranks a checkpoint's scores; a prediction file is already ranked")


def test_out_that_is_a_file_or_an_index_is_named(corpus_run, tmp_path):
    root = corpus_run[0]
    (tmp_path / "f").write_text("mine")
    res = _invoke("--checkpoint", root / "run", "--shards", root / "shards" / "test", "--protocol", "didemo",
                  "--out", tmp_path / "f")
    _refused(res, "--out")
    assert (tmp_path / "f").read_text() == "mine"
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "index.json").write_text("{}")
    res = _invoke("--checkpoint", root / "run", "--shards", root / "shards" / "test", "--protocol", "didemo",
                  "--out", tmp_path / "idx")
    _refused(res, "is a search index")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["index.json"]


def test_checkpoint_ranking_options_are_applied(corpus_run, tmp_path):
    from wsra_dist.corpus.protocol import evaluate_corpus

    root = corpus_run[0]
    run, test = root / "run", root / "shards" / "test"
    res = _invoke("--checkpoint", run, "--shards", test, "--protocol", "didemo", "--out", tmp_path / "cli",
                  "--chunk-consistency", "3", "--batch-size", "5")
    assert res.exit_code == 0, (res.output, res.exception)
    got = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    want, _ = evaluate_corpus(str(run), str(test), tmp_path / "api", chunk_consistency=3.0, batch_size=5)
    base, _ = evaluate_corpus(str(run), str(test), tmp_path / "base", chunk_consistency=0.0)
    assert (tmp_path / "cli" / "predictions_corpus.jsonl").read_text() == (tmp_path / "api" / "predictions_corpus.jsonl").read_text()
    assert (tmp_path / "api" / "predictions_corpus.jsonl").read_text() != (tmp_path / "base" / "predictions_corpus.jsonl").read_text()
    assert got["R@10,IoU=0.5"] == pytest.approx(want["R@10,IoU=0.5"])
    # the run's recipe names its training shards: the prior row is there, and no note is printed before it
    assert any(r.startswith("Prior") for r in got["rows"])


def test_prediction_report_has_the_prior_row_with_training_annotations(corpus_run, tmp_path):
    from wsra_dist.corpus.protocol import PRIOR_ROW

    root, out, res, _ = corpus_run
    args = ["--predictions", out / "predictions_corpus.jsonl", "--shards", root / "shards" / "test",
            "--protocol", "didemo"]
    r = _invoke(*args, "--out", tmp_path / "plain")
    assert r.exit_code == 0, (r.output, r.exception)
    m = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    md = (tmp_path / "plain" / "table.md").read_text()
    assert m["rule"].startswith("DiDeMo: majority moment") and list(m["rows"]) == ["Chance (exact)", "predictions_corpus.jsonl"]
    assert "Oracle video:" not in md and "Prior: a random video order" not in md and "--train-annotations" in md
    r = _invoke(*args, "--out", tmp_path / "prior", "--train-annotations", root / "data" / "train_data.json")
    assert r.exit_code == 0, (r.output, r.exception)
    m = json.loads((tmp_path / "prior" / "metrics.json").read_text())
    # the same prior as the checkpoint's table (the planted training file is what its shards were packed from)
    assert m["rows"][PRIOR_ROW] == pytest.approx(res["rows"][PRIOR_ROW])
    assert "Prior: a random video order" in (tmp_path / "prior" / "table.md").read_text()


def test_duplicate_moments_are_refused_and_a_score_may_be_left_out(corpus_run, tmp_path):
    from wsra_dist.corpus.predictions import score_predictions

    root, out, res, _ = corpus_run
    lines = (out / "predictions_corpus.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    dup = dict(row, moments=row["moments"][:3] + [row["moments"][1]])
    f = tmp_path / "dup.jsonl"
    f.write_text("\n".join([json.dumps(dup)] + lines[1:]) + "\n")
    with pytest.raises(DataError, match=r"line 1: moment .* is listed twice \(ranks 2 and 4\)"):
        score_predictions(f, str(root / "shards" / "test"))
    three = [json.dumps(dict(r, moments=[m[:3] for m in r["moments"]])) for r in map(json.loads, lines)]
    f.write_text("\n".join(three) + "\n")
    got, _, _ = score_predictions(f, str(root / "shards" / "test"))
    assert got["R@1,IoU=0.5"] == pytest.approx(res["R@1,IoU=0.5"])


def test_short_didemo_videos_have_no_moments_past_their_end(corpus_run, tmp_path):
    """A 25-s DiDeMo video has 5 chunks: its spans that reach a 6th are stored (the parts layout keeps 21) but
    never ranked, written or accepted; the features source reads the same 25 s from the zero-padded chunk."""
    import h5py
    import numpy as np

    from wsra_dist.corpus.features_source import didemo_length
    from wsra_dist.corpus.index import CorpusIndex, build_index
    from wsra_dist.corpus.predictions import score_predictions
    from wsra_dist.corpus.search import Searcher

    root, out, res, _ = corpus_run
    build_index(root / "run", [str(root / "shards" / "test")], tmp_path / "idx", "fp32")
    idx = CorpusIndex.load(tmp_path / "idx")
    c = idx.corpus
    dur = dict(zip(c.videos, c.durations))
    short = [v for v, d in dur.items() if d < 30]
    assert short and c.valid is not None and c.n_valid == c.size - 6 * len(short)
    s = Searcher(idx, device="cpu")
    for q in ("a person opens a door", "someone kicks the ball", "a woman picks up a book"):
        for m in s.search(q, top_k=200, nms=1.0):
            assert m.end <= dur[m.video] + 1e-6, m
    assert res["candidates"] == c.n_valid
    lines = (out / "predictions_corpus.jsonl").read_text().splitlines()
    for line in lines:
        for v, a, b, _ in json.loads(line)["moments"]:
            assert b <= dur[v] + 1e-6
    row = json.loads(lines[0])
    row["moments"][0] = [short[0], 20.0, 30.0, 0.9]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
    with pytest.raises(DataError, match=r"line 1: moment .* ends after the video \(25 s\)"):
        score_predictions(f, str(root / "shards" / "test"))
    with h5py.File(root / "data" / "average_global_flow.h5") as h:
        assert didemo_length(h[short[0]][()]) == dur[short[0]] == 25.0
    assert didemo_length(np.ones((6, 4))) == 30.0 and didemo_length(np.zeros((6, 4))) == 30.0


def test_recipe_paths_resolve_from_the_run_folder_when_not_from_here(tmp_path, monkeypatch):
    from wsra_dist.run_folder import recipe_path

    repo = tmp_path / "repo"
    (repo / "runs" / "x").mkdir(parents=True)
    (repo / "shards" / "train").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert recipe_path(repo / "runs" / "x", "shards/train") == str(repo / "shards" / "train")
    assert recipe_path(repo / "runs" / "x", "shards/nope") == "shards/nope"  # the caller's error names it
    assert recipe_path(repo / "runs" / "x", "https://host/shards") == "https://host/shards"
    monkeypatch.chdir(repo)
    assert recipe_path(repo / "runs" / "x", "shards/train") == "shards/train"  # as training read it


def test_training_annotations_of_the_evaluated_videos_are_refused(corpus_run, tmp_path):
    root, out, _, _ = corpus_run
    res = _invoke("--predictions", out / "predictions_corpus.jsonl", "--shards", root / "shards" / "test",
                  "--protocol", "didemo", "--out", tmp_path / "ev", "--train-annotations",
                  root / "data" / "test_data.json")
    _refused(res, "share")
    assert "would use the evaluated timestamps" in str(res.exception)

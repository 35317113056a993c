"""`wsra-dist pseudo-label` (evaluation/pseudo_labels.py): a copy of the training shards whose query times are
the run's top-1 moments, as evaluate ranks them; nothing else changes and no annotated time is kept."""

import json

import pytest
import torch

from wsra_dist.data.loader import EpochLoader, ShardSource, iter_eval_batches
from wsra_dist.data.records import DataError
from wsra_dist.data.shards import read_metas, shard_urls, verify
from wsra_dist.evaluation.predict import load_run, rank_batch
from wsra_dist.evaluation.pseudo_labels import pseudo_label
from wsra_dist.model import WSRA


def _run(tmp_path, manifest, mode="span"):
    info = {"benchmark": manifest["benchmark"], "layout": None, "text": manifest["text"],
            "dims": {"video": manifest["dims"]["video"], "text": manifest["dims"]["text"]},
            "model": {"hidden": 16, "depth": 1, "dropout": 0.0, "input_norm": "none", "scale_calibration": mode,
                      "span_threshold": 0.25}}
    torch.manual_seed(0)
    return WSRA.from_info(info).save_pretrained(tmp_path / f"run_{mode}")


def _metas(folder):
    m = json.loads((folder / "manifest.json").read_text())
    return [meta for url in shard_urls(str(folder), m) for meta in read_metas(url)]


def test_times_are_the_runs_top1_and_nothing_else_changes(planted_charades, tmp_path):
    train = planted_charades / "shards" / "train"
    src = ShardSource.open(str(train))
    run = _run(tmp_path, src.manifest)
    out = tmp_path / "pseudo"
    m = pseudo_label(run, str(train), out, "cpu")
    assert verify(out) == [] and m["num_queries"] == src.manifest["num_queries"]
    assert m["pseudo_labels"]["ranking"] == {"scale_calibration": "span", "span_threshold": 0.25, "span_band": 0.0}
    assert m["pseudo_labels"]["source_shards"] == str(train.resolve())
    # the evaluate ranking of every training query, computed independently
    model, _ = load_run(run)
    top1, conf = {}, {}
    for b in iter_eval_batches(src, 16):
        for p in rank_batch(model, b, "charades", torch.device("cpu")):
            top1[p["query_id"]] = p["moments"][0]
            conf[p["query_id"]] = p["scores"][0]
    before, after = _metas(train), _metas(out)
    assert [x["video"] for x in before] == [x["video"] for x in after]
    for a, b in zip(before, after):
        assert {k: v for k, v in a.items() if k != "queries"} == {k: v for k, v in b.items() if k != "queries"}
        for qa, qb in zip(a["queries"], b["queries"]):
            assert qb["times"] == [[qb["start"], qb["end"]]] == [top1[qa["query_id"]]] and qb["pseudo"] is True
            assert qb["weight"] == 1.0  # keep 1: every query's times train L_supervised
            assert {k: v for k, v in qa.items() if k not in ("times", "start", "end")} == \
                {k: v for k, v in qb.items() if k not in ("times", "start", "end", "pseudo", "weight")}
    moved = sum(qa["times"] != qb["times"] for a, b in zip(before, after) for qa, qb in zip(a["queries"], b["queries"]))
    assert moved > 0.9 * m["num_queries"]  # the annotated times are gone, not kept beside
    # the copy trains: the supervised target is the pseudo moment
    batch = next(iter(EpochLoader(ShardSource.open(str(out)), 8, seed=0).epoch(0)))
    assert torch.allclose(batch.target.sum(1), torch.ones(8))
    assert m["pseudo_labels"]["keep"] == 1.0 and m["pseudo_labels"]["confidence_floor"] is None


def test_keep_gives_the_most_confident_fraction_weight_one(planted_charades, tmp_path):
    """--keep 0.4: the 40 % of queries with the highest top-1 score keep weight 1 (L_supervised uses their
    times), the others weight 0 (their target is all zeros: the weak losses alone); the times are the same."""
    train = planted_charades / "shards" / "train"
    src = ShardSource.open(str(train))
    run = _run(tmp_path, src.manifest)
    full = {q["query_id"]: q for meta in _metas(tmp_path / "all") for q in meta["queries"]} \
        if pseudo_label(run, str(train), tmp_path / "all", "cpu") else {}
    m = pseudo_label(run, str(train), tmp_path / "part", "cpu", keep=0.4)
    part = {q["query_id"]: q for meta in _metas(tmp_path / "part") for q in meta["queries"]}
    assert {k: q["times"] for k, q in part.items()} == {k: q["times"] for k, q in full.items()}
    model, _ = load_run(run)
    conf = {p["query_id"]: p["scores"][0] for b in iter_eval_batches(src, 16)
            for p in rank_batch(model, b, "charades", torch.device("cpu"))}
    scores = sorted(conf.values(), reverse=True)
    n_keep = -(-4 * len(scores) // 10)
    assert m["pseudo_labels"]["keep"] == 0.4 and m["pseudo_labels"]["confidence_floor"] == scores[n_keep - 1]
    kept = {k for k, q in part.items() if q["weight"] == 1.0}
    assert kept == {k for k in part if conf[k] >= scores[n_keep - 1]}
    assert n_keep <= len(kept) < len(part) and all(q["weight"] in (0.0, 1.0) for q in part.values())
    for b in EpochLoader(ShardSource.open(str(tmp_path / "part")), 8, seed=0).epoch(0):
        w = torch.tensor([part[x["query_id"]]["weight"] for x in b.meta])
        assert torch.allclose(b.target.sum(1), w)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(DataError, match="--keep must be a fraction in"):
            pseudo_label(run, str(train), tmp_path / "bad", "cpu", keep=bad)
    assert not (tmp_path / "bad").exists()


def test_the_span_ranking_can_be_replaced_and_is_recorded(planted_charades, tmp_path):
    """--span-threshold / --span-band: the top-1 of that ranking (as evaluate ranks with the same values), and the
    manifest says which; refused for a checkpoint that does not rank by span, and for bad values, before writing."""
    train = planted_charades / "shards" / "train"
    src = ShardSource.open(str(train))
    run = _run(tmp_path, src.manifest)
    m = pseudo_label(run, str(train), tmp_path / "band", "cpu", span_threshold=-0.3, span_band=0.8)
    assert m["pseudo_labels"]["ranking"] == {"scale_calibration": "span", "span_threshold": -0.3, "span_band": 0.8}
    model, _ = load_run(run)
    model.span_threshold, model.span_band = -0.3, 0.8
    top1 = {p["query_id"]: p["moments"][0] for b in iter_eval_batches(src, 16)
            for p in rank_batch(model, b, "charades", torch.device("cpu"))}
    got = {q["query_id"]: q["times"][0] for meta in _metas(tmp_path / "band") for q in meta["queries"]}
    assert got == top1
    plain = {q["query_id"]: q["times"][0] for meta in _metas(tmp_path / "plain") for q in meta["queries"]} \
        if pseudo_label(run, str(train), tmp_path / "plain", "cpu") else {}
    assert sum(got[k] != plain[k] for k in got) > 0  # the band moved some edges
    contrast = _run(tmp_path, src.manifest, mode="contrast")
    with pytest.raises(DataError, match="parameters of the span ranking, but .* ranks by contrast"):
        pseudo_label(contrast, str(train), tmp_path / "o1", "cpu", span_band=0.5)
    with pytest.raises(DataError, match="--span-band must be a finite number >= 0"):
        pseudo_label(run, str(train), tmp_path / "o2", "cpu", span_band=-1.0)
    assert not any((tmp_path / n).exists() for n in ("o1", "o2"))


def test_refusals_name_the_input(planted_charades, planted_didemo, tmp_path):
    train = planted_charades / "shards" / "train"
    run = _run(tmp_path, ShardSource.open(str(train)).manifest)
    with pytest.raises(DataError, match="not a trained run folder"):
        pseudo_label(tmp_path / "nothing", str(train), tmp_path / "o1", "cpu")
    with pytest.raises(DataError, match="'didemo' shards; pseudo-labels are written for snippet benchmarks"):
        pseudo_label(run, str(planted_didemo / "shards" / "train"), tmp_path / "o2", "cpu")
    pseudo_label(run, str(train), tmp_path / "p", "cpu")
    with pytest.raises(DataError, match="already pseudo-labelled"):
        pseudo_label(run, str(tmp_path / "p"), tmp_path / "o3", "cpu")
    with pytest.raises(DataError, match="is the --shards folder"):
        pseudo_label(run, str(train), train, "cpu")
    assert verify(train) == []
    other = _run(tmp_path / "x", {**ShardSource.open(str(train)).manifest, "benchmark": "activitynet"})
    with pytest.raises(DataError, match="was trained on 'activitynet' shards"):
        pseudo_label(other, str(train), tmp_path / "o4", "cpu")
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3", "o4"))


def test_the_prior_rows_read_the_source_shards_annotated_times(planted_charades, tmp_path):
    from wsra_dist.evaluation.priors import training_from_shards

    train = planted_charades / "shards" / "train"
    run = _run(tmp_path, ShardSource.open(str(train)).manifest)
    pseudo_label(run, str(train), tmp_path / "p", "cpu")
    a = training_from_shards(str(train), "charades")
    b = training_from_shards(str(tmp_path / "p"), "charades")
    assert a.queries == b.queries and len(a.queries) > 0
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())  # a set naming itself as its source
    m["pseudo_labels"]["source_shards"] = str(tmp_path / "p")
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="whose source is not annotated shards"):
        training_from_shards(str(tmp_path / "p"), "charades")

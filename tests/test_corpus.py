"""Video-corpus moment retrieval: metrics against slow loops and hand-made cases, chance by enumeration, the
protocol's files on a trained checkpoint, the index (build, append, refusals) and search."""

import itertools
import json
import random

import numpy as np
import pytest
import torch

from wsra_dist.corpus import metrics as VM
from wsra_dist.data.records import DataError


def test_hand_made_ranking():
    # 3 videos x 3 candidates; the query is of video 1, moment [0, 10]
    video_of = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    starts = np.array([0, 0, 5, 0, 0, 5, 0, 0, 5], float)
    ends = np.array([5, 10, 10, 5, 10, 10, 5, 10, 10], float)
    hits = VM.hit_mask(starts, ends, video_of, 1, (0, 10), 0.5)
    assert hits.tolist() == [False] * 3 + [True, True, True] + [False] * 3  # IoU .5, 1, .5
    assert VM.hit_mask(starts, ends, video_of, 1, (0, 10), 0.7).tolist() == [False] * 4 + [True] + [False] * 4
    ranking = np.array([1, 7, 5, 4, 0])
    assert VM.first_hit_rank(ranking, hits) == 3
    assert VM.video_rank(video_of[ranking], 1) == 3 and VM.video_rank(video_of[ranking], 0) == 1
    assert VM.first_hit_rank(np.array([0, 8]), hits) == 0
    m = VM.metrics_from_ranks({0.5: [3], 0.7: [4]}, [3])
    assert m["R@1,IoU=0.5"] == 0 and m["R@10,IoU=0.5"] == 100 and m["video_R@1"] == 0 and m["video_R@10"] == 100
    assert list(m) == VM.metric_keys()


def test_chance_is_exact_by_enumeration():
    M, h = 6, 2
    hits = set(range(h))
    for k in (1, 2, 3, 6):
        perms = list(itertools.permutations(range(M)))
        p = np.mean([any(x in hits for x in perm[:k]) for perm in perms])
        assert VM.chance_recall(M, h, k) == pytest.approx(p)
    assert VM.chance_recall(5, 0, 3) == 0.0 and VM.chance_recall(5, 1, 9) == 1.0


def test_interleaved_prior_expectation_by_enumeration():
    V, per = 4, 3
    for hit_js, k in (([2], 5), ([1, 3], 1), ([3], 12), ([2], 4)):
        vals = []
        for order in itertools.permutations(range(V)):  # the query's video is video 0
            p = order.index(0) + 1
            ranking = [(j, v) for j in range(1, per + 1) for v in order]  # interleaved by rank
            first = next(i + 1 for i, (j, v) in enumerate(ranking) if v == 0 and j in hit_js)
            vals.append(first <= k)
            assert first == (min(hit_js) - 1) * V + p
        assert VM.interleaved_prior_recall(hit_js, V, k) == pytest.approx(np.mean(vals))


def _slow_reference(scores, video_of, iou_s, iou_e, qvideo, qmoment, k, m):
    """Loop reference: sort every candidate by score, walk the list."""
    n = 0
    for q in range(len(qvideo)):
        order = sorted(range(len(video_of)), key=lambda i: -scores[q][i])
        for i in order[:k]:
            if video_of[i] == qvideo[q]:
                s, e = iou_s[i], iou_e[i]
                gs, ge = qmoment[q]
                inter = max(0.0, min(e, ge) - max(s, gs))
                union = max(e, ge) - min(s, gs)
                if inter / union >= m:
                    n += 1
                    break
    return 100.0 * n / len(qvideo)


def test_rank_queries_and_rows_match_the_slow_reference():
    import torch

    from wsra_dist.corpus.candidates import Corpus, CorpusQueries
    from wsra_dist.corpus.protocol import model_rows, rank_queries
    from wsra_dist.corpus.store import DenseStore
    from wsra_dist.model import WSRA

    rng = random.Random(0)
    info = {"dims": {"video": 8, "text": 6}, "layout": None,
            "model": {"hidden": 5, "depth": 1, "dropout": 0.0, "input_norm": "none"}}
    model = WSRA.from_info(info).eval()
    V, C, Q = 7, 4, 9
    torch.manual_seed(0)
    pv = torch.randn(V * C, 5)
    video_of = np.repeat(np.arange(V), C)
    starts = np.tile([0.0, 0.0, 10.0, 20.0], V)
    ends = np.tile([10.0, 30.0, 20.0, 30.0], V)
    corpus = Corpus([f"v{i}" for i in range(V)], [30.0] * V, DenseStore(pv), video_of, starts, ends, False)
    qv = np.array([rng.randrange(V) for _ in range(Q)])
    qm = np.array([[0.0, 12.0] if rng.random() < 0.5 else [18.0, 30.0] for _ in range(Q)])
    queries = CorpusQueries(list(range(Q)), [""] * Q, np.random.RandomState(0).randn(Q, 6).astype(np.float32), qv, qm)
    ranked = rank_queries(model, corpus, queries, torch.device("cpu"))
    model_m, oracle = model_rows(corpus, queries, ranked)
    with torch.no_grad():
        pt = model.scorer.project_text(torch.as_tensor(queries.text))
        scores = (torch.relu(pv[None] + pt[:, None]) @ model.scorer.tail[-1].weight[0] + model.scorer.tail[-1].bias).numpy()
    for m in VM.IOUS:
        for k in (1, 10):
            assert model_m[f"R@{k},IoU={m}"] == pytest.approx(
                _slow_reference(scores, video_of, starts, ends, qv, qm, k, m), abs=1e-9)
    # video rank: 1 + videos whose best candidate beats the query's video's best
    best = np.stack([scores[:, video_of == v].max(1) for v in range(V)], 1)
    want = [100 * np.mean([(best[q] > best[q, qv[q]]).sum() + 1 <= k for q in range(Q)]) for k in (1, 10)]
    assert [model_m["video_R@1"], model_m["video_R@10"]] == pytest.approx(want)
    assert oracle["video_R@1"] == 100.0 and oracle["R@100,IoU=0.5"] >= model_m["R@100,IoU=0.5"]


def test_protocol_files_and_rows(corpus_run):
    root, out, res, md = corpus_run
    m = json.loads((out / "metrics.json").read_text())
    for k in VM.metric_keys():  # the contract's keys at the top level
        assert k in m and 0 <= m[k] <= 100
    rows = m["rows"]
    chance = rows["Chance (exact)"]
    assert m["R@10,IoU=0.5"] > 3 * chance["R@10,IoU=0.5"]  # the planted model finds moments across videos
    assert rows["Oracle video (the model's ranking inside the right video)"]["R@1,IoU=0.5"] >= m["R@1,IoU=0.5"]
    assert any("uses training timestamps" in r for r in rows)
    lines = (out / "predictions_corpus.jsonl").read_text().splitlines()
    assert len(lines) == m["queries"]
    first = json.loads(lines[0])
    assert set(first) == {"query_id", "moments"} and len(first["moments"]) == 100
    scores = [x[3] for x in first["moments"]]
    assert scores == sorted(scores, reverse=True) and all(len(x) == 4 and x[1] < x[2] for x in first["moments"])
    assert "No published VCMR row uses these features" in md


def test_index_build_append_and_search(corpus_run, tmp_path):
    from wsra_dist.corpus.index import CorpusIndex, build_index
    from wsra_dist.corpus.search import Searcher

    root = corpus_run[0]
    idx = tmp_path / "idx"
    build_index(root / "run", [str(root / "shards" / "test")], idx, "fp16")
    a = CorpusIndex.load(idx)
    assert a.manifest["dtype"] == "fp16" and a.manifest["layout"] == "didemo_chunks"
    assert a.corpus.store.g.dtype == torch.float16 and a.corpus.size == 21 * len(a.corpus.videos)
    with pytest.raises(DataError, match="already holds video"):
        build_index(root / "run", [str(root / "shards" / "test")], idx, "fp16")
    assert CorpusIndex.load(idx).corpus.size == a.corpus.size  # the refused append left the index as it was
    build_index(root / "run", [str(root / "shards" / "val")], idx, "fp16")
    b = CorpusIndex.load(idx)
    assert len(b.corpus.videos) > len(a.corpus.videos) and not list(tmp_path.glob(".idx*"))
    s = Searcher(b)
    res = s.search("a person opens a door", top_k=7, nms=1.0)
    # the same ranking computed directly: relu(pv + pt) . w + c over every candidate of the (fp16) index
    with torch.no_grad():
        pt = b.model.scorer.project_text(torch.as_tensor(s.encoder.encode(["a person opens a door"])))
        last = b.model.scorer.tail[-1]
        pv = b.corpus.store.flat()
        direct = (torch.relu(pv + pt) @ last.weight[0] + last.bias).double()
    best = torch.topk(direct, 7).indices.numpy()
    assert [(r.video, r.start) for r in res] == [(b.corpus.videos[b.corpus.video_of[i]], b.corpus.starts[i]) for i in best]
    assert [r.score for r in res] == pytest.approx(torch.sigmoid(direct[best]).tolist(), abs=1e-6)
    assert all(r.video in b.corpus.videos and 0 <= r.start < r.end for r in res)
    for bad in ("", "   ", "x" * 5000):
        with pytest.raises(DataError):
            s.search(bad)
    # the same candidates scored through the protocol's path and through search agree (fp16 storage aside)
    top = s.search("a person opens a door", top_k=1, nms=1.0)[0]
    assert top.score > 0


def test_index_refuses_another_model(corpus_run, tmp_path):
    from wsra_dist.corpus.index import CorpusIndex, check_same_model

    from wsra_dist.corpus.index import build_index

    root = corpus_run[0]
    build_index(root / "run", [str(root / "shards" / "test")], tmp_path / "i", "fp32")
    m = CorpusIndex.load(tmp_path / "i").manifest
    with pytest.raises(DataError, match="built with another model"):
        check_same_model(m, "0" * 64, "idx")
    with pytest.raises(DataError, match="not an index"):
        CorpusIndex.load(tmp_path)


def test_prediction_files_score_like_the_checkpoint_and_bad_lines_are_named(corpus_run, tmp_path):
    from wsra_dist.corpus.predictions import score_predictions

    root, out, res, _ = corpus_run
    got, chance, sizes = score_predictions(out / "predictions_corpus.jsonl", str(root / "shards" / "test"))
    assert sizes == (res["queries"], res["videos"], res["candidates"])
    for k in VM.metric_keys():
        if k.startswith("video_R@10"):
            continue  # the file's top 100 moments may hold fewer than 10 distinct videos
        assert got[k] == pytest.approx(res[k]), k
    assert chance == pytest.approx(res["rows"]["Chance (exact)"])
    lines = (out / "predictions_corpus.jsonl").read_text().splitlines()
    for bad, want in ((lines[:-1], "have no line"), (lines + lines[:1], "already given"),
                      (["{oops"] + lines[1:], "line 1: not JSON"),
                      ([lines[0].replace('"moments": [["', '"moments": [["nope')] + lines[1:], "not in the evaluated split"),
                      ([json.dumps({"query_id": "x", "moments": []})] + lines[1:], "not a query of the evaluated"),
                      ([_first_moment(lines[0], 2, "+2.5")] + lines[1:], "chunk spans"),
                      ([_first_moment(lines[0], 2, 35.0)] + lines[1:], "chunk spans"),
                      ([_first_moment(lines[0], 1, -5.0)] + lines[1:], "0 <= start"),
                      ([_first_moment(lines[0], 3, "high")] + lines[1:], "finite score")):
        f = tmp_path / "p.jsonl"
        f.write_text("\n".join(bad) + "\n")
        with pytest.raises(DataError, match=want):
            score_predictions(f, str(root / "shards" / "test"))


def _first_moment(line: str, field: int, value) -> str:
    row = json.loads(line)
    row["moments"][0][field] = row["moments"][0][1] + 2.5 if value == "+2.5" else value  # "+2.5": off the 5-s grid
    return json.dumps(row)


def test_cli_evaluate_corpus_index_search(corpus_run, tmp_path):
    from .helpers import run_cli

    root, out, res, _ = corpus_run
    run, test = str(root / "run"), str(root / "shards" / "test")
    p = run_cli("evaluate", "--corpus", "--checkpoint", run, "--shards", test, "--protocol", "didemo",
                "--out", str(tmp_path / "ev"))
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["R@10,IoU=0.5"] == pytest.approx(res["R@10,IoU=0.5"]) and "Oracle video" in p.stdout
    p = run_cli("evaluate", "--corpus", "--predictions", str(out / "predictions_corpus.jsonl"), "--shards", test,
                "--protocol", "didemo", "--out", str(tmp_path / "ev2"))
    assert json.loads((tmp_path / "ev2" / "metrics.json").read_text())["R@1,IoU=0.5"] == pytest.approx(res["R@1,IoU=0.5"])
    p = run_cli("evaluate", "--corpus", "--checkpoint", run, "--shards", test, "--protocol", "charades",
                "--out", str(tmp_path / "ev3"), check=False)
    assert p.returncode == 2 and "not --protocol charades" in p.stderr
    run_cli("index", "--checkpoint", run, "--shards", test, "--out", str(tmp_path / "idx"))
    p = run_cli("search", str(tmp_path / "idx"), "a person opens a door", "--top-k", "3", "--json")
    rows = [json.loads(x) for x in p.stdout.strip().splitlines()]
    assert len(rows) == 3 and set(rows[0]) == {"video", "start", "end", "score"}
    p = run_cli("search", str(tmp_path / "idx"), "a person opens a door", "--top-k", "3")
    lines = [x for x in p.stdout.splitlines() if "(logit " in x]
    assert len(lines) == 3 and [float(x.split("(logit ")[1].rstrip(")")) for x in lines] == \
        sorted((float(x.split("(logit ")[1].rstrip(")")) for x in lines), reverse=True)
    p = run_cli("search", str(tmp_path), "x", check=False)
    assert p.returncode == 2 and "not an index" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run_cli("search", str(tmp_path / "idx"), "  ", check=False)
    assert p.returncode == 2 and "query is empty" in p.stderr

"""`wsra-dist evaluate --corpus`: VCMR on a checkpoint + shards, with chance, prior and oracle-video rows.

Every query is ranked against every candidate of every video of the evaluated split.  Files (contracts):
OUT/metrics.json (the model's "R@1,IoU=0.5", ..., "video_R@10" at the top level, every row under "rows"), OUT/predictions_corpus.jsonl
(one line per query: {"query_id", "moments": [[video, start_s, end_s, score], ...]}, its top 100, best first),
OUT/table.md.  Rule for the query's moment: DiDeMo's majority moment (the annotator pair chosen most often,
first chosen on ties; IoU on the chunk grid), the benchmark's single moment elsewhere (IoU in seconds).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from . import metrics as VM
from .candidates import Corpus, CorpusQueries, corpus_ranking, read_split
from .search import corpus_logits
from ..data.records import DataError

TOP = 100
QUERY_BATCH = 64
RULE = {"didemo": "DiDeMo: majority moment of the annotators (ties: the first chosen), IoU on the 5-s chunk grid",
        "charades": "Charades-STA: the query's moment, IoU in seconds",
        "activitynet": "ActivityNet Captions: the query's moment, IoU in seconds"}


def _hits(corpus: Corpus, queries: CorpusQueries, m: float) -> list[np.ndarray]:
    """Per query, the corpus indices of its hits at IoU m."""
    out = []
    for v, mom in zip(queries.video, queries.moment):
        mask = VM.hit_mask(corpus.iou_starts, corpus.iou_ends, corpus.video_of, int(v), mom, m)
        if corpus.valid is not None:
            mask &= corpus.valid
        out.append(np.flatnonzero(mask))
    return out


def rank_queries(model, corpus: Corpus, queries: CorpusQueries, device, progress=None,
                 protocol: str | None = None, batch_size: int = QUERY_BATCH) -> dict:
    """Top-TOP candidates, the video rank and the oracle-video ranking of every query (model scores)."""
    top_idx, top_logit, video_ranks, own_orders = [], [], [], []
    starts = np.concatenate([[0], np.cumsum(np.bincount(corpus.video_of, minlength=len(corpus.videos)))])
    pvd = corpus.to(device)
    vid_t = torch.as_tensor(corpus.video_of, device=device)
    for s in range(0, len(queries.ids), batch_size):
        t = torch.as_tensor(queries.text[s : s + batch_size], device=device)
        with torch.inference_mode():
            lg = corpus_logits(model, pvd, model.scorer.project_text(t), protocol).double()
            k = min(TOP, corpus.size)
            tv, ti = torch.topk(lg, k, dim=1)
            vmax = torch.full((lg.shape[0], len(corpus.videos)), float("-inf"), dtype=lg.dtype, device=device)
            vmax.scatter_reduce_(1, vid_t.expand(lg.shape[0], -1), lg, reduce="amax")
        for r in range(lg.shape[0]):
            v = int(queries.video[s + r])
            # video rank: 1 + videos whose best candidate scores higher (ties count for the query's video)
            video_ranks.append(int((vmax[r] > vmax[r, v]).sum()) + 1)
            own = lg[r, starts[v] : starts[v + 1]].cpu().numpy()
            own_orders.append(starts[v] + np.argsort(-own, kind="stable"))
        top_idx.append(ti.cpu().numpy())
        top_logit.append(tv.cpu().numpy())
        if progress:
            progress(min(s + batch_size, len(queries.ids)))
    return {"top": np.concatenate(top_idx) if top_idx else np.zeros((0, 0), int),
            "top_logit": np.concatenate(top_logit) if top_logit else np.zeros((0, 0)),
            "video_ranks": video_ranks, "own_orders": own_orders}


def model_rows(corpus: Corpus, queries: CorpusQueries, ranked: dict) -> tuple[dict, dict]:
    """(model metrics, oracle-video metrics)."""
    hit_ranks, oracle = {}, {}
    for m in VM.IOUS:
        hits = _hits(corpus, queries, m)
        hit_ranks[m] = []
        oracle[m] = []
        for q, h in enumerate(hits):
            mask = np.zeros(corpus.size, dtype=bool)
            mask[h] = True
            hit_ranks[m].append(VM.first_hit_rank(ranked["top"][q], mask))
            oracle[m].append(VM.first_hit_rank(ranked["own_orders"][q], mask))
    model = VM.metrics_from_ranks(hit_ranks, ranked["video_ranks"])
    ora = VM.metrics_from_ranks(oracle, [1] * len(queries.ids))  # the right video is given
    return model, ora


def chance_row(corpus: Corpus, queries: CorpusQueries) -> dict:
    n_hits = {m: [len(h) for h in _hits(corpus, queries, m)] for m in VM.IOUS}
    return VM.chance_metrics(corpus.n_valid, n_hits, len(corpus.videos))


def prior_row(corpus: Corpus, queries: CorpusQueries, protocol: str, train) -> dict:
    """Videos in a random order (exact expectation), each video's candidates by the training prior, interleaved by
    rank (every video's first choice, then every second ...).  Uses training timestamps.  Exact while every
    video has at least as many candidates as the hit's rank (a 25-s DiDeMo video has 15 spans, a 30-s one 21:
    beyond rank 15 the interleaving would skip the short videos, which matters only for k > 15 V)."""
    from ..evaluation.priors import didemo_frequency_ranking, length_position_order, normalised_spans

    train.check_apart(corpus.videos, "the evaluated corpus")
    V = len(corpus.videos)
    starts = np.concatenate([[0], np.cumsum(np.bincount(corpus.video_of, minlength=V))])
    if protocol == "didemo":
        rank = {p: i for i, p in enumerate(didemo_frequency_ranking([q["times"] for q in train.queries]))}
        order_in_video = {}
        for v in range(V):  # the video's candidates (chunk spans from their seconds) in the prior's order
            idx = np.arange(starts[v], starts[v + 1])
            spans = zip(np.rint(corpus.starts[idx] / 5).astype(int), np.rint(corpus.ends[idx] / 5).astype(int) - 1)
            order_in_video[v] = idx[np.argsort([rank[p] for p in spans], kind="stable")]
    else:
        spans = normalised_spans(train.queries)
        order_in_video = {}
        for v in range(V):
            s, e = corpus.starts[starts[v]: starts[v + 1]], corpus.ends[starts[v]: starts[v + 1]]
            norm = np.stack([s, e], 1) / corpus.durations[v]
            order_in_video[v] = starts[v] + length_position_order(norm, spans)
    if corpus.valid is not None:  # a short DiDeMo video's ranking holds only its own spans
        order_in_video = {v: o[corpus.valid[o]] for v, o in order_in_video.items()}
    out = {}
    for m in VM.IOUS:
        hits = _hits(corpus, queries, m)
        for k in VM.KS:
            vals = []
            for q, h in enumerate(hits):
                order = order_in_video[int(queries.video[q])]
                pos = [int(np.flatnonzero(order == i)[0]) + 1 for i in h]
                vals.append(VM.interleaved_prior_recall(pos, V, k))
            out[f"R@{k},IoU={m}"] = 100.0 * float(np.mean(vals)) if vals else float("nan")
    out.update({f"video_R@{k}": 100.0 * min(k, V) / V for k in VM.VIDEO_KS})
    return out


def write_predictions(path: Path, corpus: Corpus, queries: CorpusQueries, ranked: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for q, qid in enumerate(queries.ids):
            idx, lg = ranked["top"][q], ranked["top_logit"][q]
            keep = np.isfinite(lg)  # masked candidates (past a short video's end) only fill a tiny corpus's top
            idx, lg = idx[keep], lg[keep]
            sc = 1.0 / (1.0 + np.exp(-lg))
            f.write(json.dumps({"query_id": qid, "moments": [
                [corpus.videos[int(corpus.video_of[i])], round(float(corpus.starts[i]), 3),
                 round(float(corpus.ends[i]), 3), float(s)] for i, s in zip(idx, sc)]}) + "\n")
    os.replace(tmp, path)


PRIOR_ROW = "Prior: random video order, training prior within each video (uses training timestamps)"
ORACLE_ROW = "Oracle video (the model's ranking inside the right video)"


def table(rows: dict[str, dict], protocol: str, n_queries: int, n_videos: int, n_cand: int, note: str = "") -> str:
    """The rows as markdown, and a caption that explains the rows present (and `note`, e.g. why one is missing)."""
    keys = VM.metric_keys()
    lines = ["| row | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
    caption = [f"Table: video-corpus moment retrieval, {n_queries} queries ranked against all {n_cand} candidates of "
               f"{n_videos} videos. Hit: the query's video and IoU >= m with its moment ({RULE.get(protocol, protocol)}).",
               "video_R@k: the query's video among the k best-scored videos (a video's score: its best candidate).",
               "Chance: exact expectation for a random ranking (videos: a random video order)."]
    if PRIOR_ROW in rows:
        caption.append("Prior: a random video order, each video's candidates by the training-annotation prior "
                       "(uses training timestamps).")
    if ORACLE_ROW in rows:
        caption.append("Oracle video: the model's ranking inside the query's own video (what is lost is finding "
                       "the video).")
    if note:
        caption.append(note)
    caption.append("No published VCMR row uses these features (Escorcia et al. 2019 and TVR report on their own "
                   "features), so none is printed beside these.")
    return "\n".join(lines + ["", " ".join(caption)])


def evaluate_corpus(checkpoint: str, shards: str, out: str | Path, device=None, train=None, progress=None,
                    scale_calibration: str | None = None, contrast_weight: float | None = None,
                    chunk_consistency: float | None = None, batch_size: int = QUERY_BATCH,
                    note: str = "") -> tuple[dict, str]:
    """Run the protocol; write metrics.json, predictions_corpus.jsonl and table.md into `out`.  The model ranks
    as its recipe says (model.scale_calibration, model.chunk_consistency), or by `scale_calibration` /
    `contrast_weight` / `chunk_consistency` when given (evaluate's overrides)."""
    from ..data.loader import ShardSource
    from ..evaluation.predict import check_compatible, load_run

    if scale_calibration == "span":  # asked for; a checkpoint's own span is set aside below (corpus_ranking)
        raise DataError("--scale-calibration span adds each query's best span to its own video's windows; the corpus "
                        "ranks one candidate set for every query: use none, standardise or contrast")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, info = load_run(checkpoint, device)
    set_aside = None
    explicit = scale_calibration is not None or contrast_weight is not None  # used as given, contrast too
    if chunk_consistency is not None:
        model.chunk_consistency = chunk_consistency
    if explicit or chunk_consistency is not None:  # the statistics of the ranking used
        from ..evaluation.calibration import attach

        try:
            attach(model, checkpoint, device, mode=scale_calibration, contrast_weight=contrast_weight)
        except ValueError as e:
            raise DataError(str(e)) from None
    if contrast_weight is not None and getattr(model, "scale_calibration", "none") != "contrast":
        raise DataError(f"--contrast-weight is λ of the contrast ranking, but this checkpoint ranks by "
                        f"{getattr(model, 'scale_calibration', 'none')}: add --scale-calibration contrast")
    if not explicit:
        set_aside = corpus_ranking(model)
    source = ShardSource.open(shards)
    check_compatible(info, source.manifest, shards)
    protocol = source.manifest["benchmark"]
    corpus, queries = read_split(model, source, protocol, device)
    ranked = rank_queries(model, corpus, queries, device, progress, protocol, batch_size)
    model_m, oracle_m = model_rows(corpus, queries, ranked)
    rows = {"Chance (exact)": chance_row(corpus, queries)}
    if train is not None:
        rows[PRIOR_ROW] = prior_row(corpus, queries, protocol, train)
    rows[ORACLE_ROW] = oracle_m
    mode = getattr(model, "scale_calibration", "none")
    label = "WSRA (this checkpoint)" + (f", scale_calibration {mode}" if mode != "none" else "")
    if set_aside:
        label += f"; φ across videos (its within-video {set_aside} ranking is not comparable between videos)"
    rows[label] = model_m
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions_corpus.jsonl", corpus, queries, ranked)
    # the model's metrics at the top level (the contract's keys), every row beside them
    result = {**model_m, "protocol": protocol, "queries": len(queries.ids), "videos": len(corpus.videos),
              "candidates": corpus.n_valid, "rule": RULE.get(protocol, protocol), "rows": rows}
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    md = table(rows, protocol, len(queries.ids), len(corpus.videos), corpus.n_valid, note)
    (out / "table.md").write_text(md + "\n")
    return result, md

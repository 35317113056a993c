"""Scoring anyone's corpus prediction file: `wsra-dist evaluate --corpus --predictions P.jsonl --shards TEST`.

A line per query, as `predictions_corpus.jsonl` (a contract): {"query_id": the benchmark's id (DiDeMo:
annotation_id), "moments": [[video, start_s, end_s, score], ...]} best first (only the order ranks, so the score
may be left out: [video, start_s, end_s]; a score that is there must be a finite number).  A moment listed twice
for one query is refused (a broken writer: it would take two of the top k).  The
truth comes from the shards' meta.json (the evaluated split: its videos are the corpus).  IoU in seconds: for
DiDeMo the majority moment [5 s, 5 (e + 1)] on the grid, the same ratio as on chunks.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..data.didemo import majority_candidate
from ..data.records import DataError
from ..geometry import DIDEMO_CANDIDATES, benchmark_windows
from ..evaluation.scoring import json_lines
from . import metrics as VM

MAX_LINE_BYTES = 1 << 20


def truth_from_shards(shards: str) -> dict:
    """Videos (name -> duration, candidate windows) and queries (id -> video, moment in seconds) of a split."""
    from ..data.shards import load_manifest, manifest_path_for, read_metas, shard_urls

    m = load_manifest(manifest_path_for(shards))
    protocol = m.get("benchmark")
    videos, queries = {}, {}
    for url in shard_urls(shards, m):
        for meta in read_metas(url):
            dur = float(meta["duration"])
            if protocol == "didemo":  # the spans inside the video (a 25-s video has 5 chunks: 15 spans)
                wins = np.array([[5.0 * s, 5.0 * (e + 1)] for s, e in DIDEMO_CANDIDATES if 5.0 * (e + 1) <= dur + 1e-6])
            else:
                wins = np.asarray(benchmark_windows(protocol, dur), dtype=np.float64)
            videos[meta["video"]] = {"duration": dur, "windows": wins}
            for q in meta["queries"]:
                if protocol == "didemo":
                    s, e = DIDEMO_CANDIDATES[majority_candidate(q["times"])]
                    mom = (5.0 * s, 5.0 * (e + 1))
                else:
                    mom = tuple(float(x) for x in q["times"][0])
                queries[q["query_id"]] = {"video": meta["video"], "moment": mom}
    return {"protocol": protocol, "videos": videos, "queries": queries}


def truth_corpus(truth: dict):
    """(Corpus, CorpusQueries) of the split's candidate intervals and queries, with no projections: what the
    prior row needs (protocol.prior_row) when a prediction file is scored.  IoU in seconds (DiDeMo's 5-s grid
    scaled: the same ratios as on chunks)."""
    import torch

    from .candidates import Corpus, CorpusQueries
    from .store import DenseStore

    names = list(truth["videos"])
    where = {v: i for i, v in enumerate(names)}
    wins = [truth["videos"][v]["windows"] for v in names]
    sec = np.concatenate(wins) if wins else np.zeros((0, 2))
    video_of = np.concatenate([np.full(len(w), i) for i, w in enumerate(wins)]) if wins else np.zeros(0, int)
    corpus = Corpus(names, [truth["videos"][v]["duration"] for v in names], DenseStore(torch.zeros(len(sec), 0)),
                    video_of.astype(np.int64), sec[:, 0], sec[:, 1], truth["protocol"] == "didemo")
    qs = truth["queries"]
    queries = CorpusQueries(list(qs), ["" for _ in qs], np.zeros((len(qs), 0), np.float32),
                            np.asarray([where[q["video"]] for q in qs.values()], dtype=np.int64),
                            np.asarray([q["moment"] for q in qs.values()], dtype=np.float64).reshape(-1, 2))
    return corpus, queries


def _moment(x, path, n) -> tuple[str, float, float]:
    ok = isinstance(x, list) and len(x) in (3, 4) and isinstance(x[0], str)
    if ok:
        try:
            s, e = float(x[1]), float(x[2])
            ok = math.isfinite(s) and math.isfinite(e) and 0 <= s < e
            if len(x) == 4:  # the score: only the order ranks, but a non-number is a broken writer
                ok = ok and not isinstance(x[3], bool) and math.isfinite(float(x[3]))
        except (TypeError, ValueError):
            ok = False
    if not ok:
        raise DataError(f"{path}: line {n}: a moment must be [video, start_s, end_s, score] with 0 <= start < end "
                        f"and a finite score, got {x!r:.120}")
    return x[0], s, e


def _check_range(path, n: int, v: str, s: float, e: float, video: dict, protocol: str) -> None:
    """A moment must lie in its video; DiDeMo's must be chunk spans (the protocol's IoU is on the 5-s grid)."""
    if protocol == "didemo":
        on_grid = abs(s / 5.0 - round(s / 5.0)) < 1e-6 and abs(e / 5.0 - round(e / 5.0)) < 1e-6
        if not on_grid or e > 30.0 + 1e-6:
            raise DataError(f"{path}: line {n}: DiDeMo moments are chunk spans (start and end multiples of 5 s, "
                            f"end <= 30), got [{v!r}, {s:g}, {e:g}]")
    if e > video["duration"] + 1e-3:
        raise DataError(f"{path}: line {n}: moment [{v!r}, {s:g}, {e:g}] ends after the video ({video['duration']:g} s)")


def read_predictions(path: str | Path, truth: dict) -> dict:
    """query id -> [(video, start, end), ...] best first; every problem names the file and line."""
    out: dict = {}
    ids = {str(k): k for k in truth["queries"]}
    for n, row in json_lines(Path(path)):  # bounded, UTF-8 checked, each bad line named
        if not isinstance(row, dict) or "query_id" not in row or not isinstance(row.get("moments"), list):
            raise DataError(f'{path}: line {n}: expected {{"query_id": ..., "moments": [[video, start_s, end_s, score], ...]}}')
        qid = ids.get(str(row["query_id"]))
        if qid is None:
            raise DataError(f"{path}: line {n}: query_id {row['query_id']!r} is not a query of the evaluated split")
        if qid in out:
            raise DataError(f"{path}: line {n}: query_id {row['query_id']!r} was already given")
        ms = [_moment(x, path, n) for x in row["moments"]]
        seen: dict = {}
        for r, m in enumerate(ms, 1):
            if m in seen:
                raise DataError(f"{path}: line {n}: moment [{m[0]!r}, {m[1]:g}, {m[2]:g}] is listed twice (ranks "
                                f"{seen[m]} and {r}); each moment once, best first")
            seen[m] = r
        for v, s, e in ms:
            if v not in truth["videos"]:
                raise DataError(f"{path}: line {n}: video {v!r} is not in the evaluated split's corpus")
            _check_range(path, n, v, s, e, truth["videos"][v], truth["protocol"])
        out[qid] = ms
    missing = [q for q in truth["queries"] if q not in out]
    if missing:
        raise DataError(f"{path}: {len(missing)} of {len(truth['queries'])} queries have no line (first: {missing[0]!r})")
    return out


def score_predictions(path: str | Path, shards: str) -> tuple[dict, dict, tuple[int, int, int]]:
    """(metrics of the file, the exact chance row, (queries, videos, candidates)) on the split's corpus."""
    truth = truth_from_shards(shards)
    preds = read_predictions(path, truth)
    hit_ranks = {m: [] for m in VM.IOUS}
    vranks, n_hits = [], {m: [] for m in VM.IOUS}
    for qid, q in truth["queries"].items():
        gs, ge = q["moment"]
        ms = preds[qid]
        same = np.array([v == q["video"] for v, _, _ in ms], dtype=bool)
        s = np.array([x[1] for x in ms]) if ms else np.zeros(0)
        e = np.array([x[2] for x in ms]) if ms else np.zeros(0)
        iou = VM.interval_iou_1d(s, e, gs, ge) if ms else np.zeros(0)
        wins = truth["videos"][q["video"]]["windows"]
        wiou = VM.interval_iou_1d(wins[:, 0], wins[:, 1], gs, ge)
        for m in VM.IOUS:
            hit = same & (iou >= m - 1e-9)
            hit_ranks[m].append(int(np.flatnonzero(hit)[0]) + 1 if hit.any() else 0)
            n_hits[m].append(int((wiou >= m - 1e-9).sum()))
        names = np.array([v for v, _, _ in ms], dtype=object)
        vranks.append(VM.video_rank(names, q["video"]) if ms else 0)
    n_cand = sum(len(v["windows"]) for v in truth["videos"].values())
    sizes = (len(truth["queries"]), len(truth["videos"]), n_cand)
    return VM.metrics_from_ranks(hit_ranks, vranks), VM.chance_metrics(n_cand, n_hits, len(truth["videos"])), sizes

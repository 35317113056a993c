"""A split's videos -> every candidate moment, projected once by φ's first layer; and its queries' truth.

φ's first layer is linear, so a candidate's projection W_v x + b does not depend on the query: a corpus is
projected once (`Corpus`) and every query costs only its own projection plus relu(pv + pt) · w + c over the
candidates (search.py).  DiDeMo's candidates are its 21 chunk spans (IoU on the chunk grid); other benchmarks'
are the protocol's proportional windows (IoU in seconds).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.didemo import majority_candidate
from ..data.loader import ShardSource, expand_queries
from ..data.shards import iter_shard
from ..geometry import DIDEMO_CANDIDATES, benchmark_windows, window_snippet_range


@dataclass
class Corpus:
    """Candidates of many videos: projections (M, H) and, per candidate, its video and its interval."""

    videos: list[str]
    durations: list[float]
    pv: torch.Tensor  # (M, H) W_v x + b of every candidate
    video_of: np.ndarray  # (M,) int: index into videos
    starts: np.ndarray  # (M,) seconds
    ends: np.ndarray
    grid: bool  # DiDeMo: IoU on chunks (iou_starts/ends in chunk units)
    iou_starts: np.ndarray = field(default=None)  # units the benchmark's IoU uses
    iou_ends: np.ndarray = field(default=None)

    def __post_init__(self):
        if self.iou_starts is None:
            self.iou_starts, self.iou_ends = self.starts, self.ends

    @property
    def size(self) -> int:
        return len(self.video_of)


@dataclass
class CorpusQueries:
    """The evaluated queries: their ids, sentences, text features, video (index) and moment (IoU units)."""

    ids: list
    sentences: list[str]
    text: np.ndarray  # (Q, Dt)
    video: np.ndarray  # (Q,) int
    moment: np.ndarray  # (Q, 2) in the corpus's IoU units


def didemo_intervals() -> tuple[np.ndarray, np.ndarray]:
    """(seconds (21, 2), chunk-grid IoU intervals (21, 2)) of DiDeMo's candidates."""
    pairs = np.asarray(DIDEMO_CANDIDATES, dtype=np.float64)
    return np.stack([5 * pairs[:, 0], 5 * (pairs[:, 1] + 1)], 1), np.stack([pairs[:, 0], pairs[:, 1] + 1], 1)


@torch.inference_mode()
def video_candidates(model, video: np.ndarray, duration: float, protocol: str, device) -> tuple[torch.Tensor, np.ndarray]:
    """(projections (C, H), seconds (C, 2)) of one video's candidates."""
    v = torch.as_tensor(np.asarray(video, dtype=np.float32), device=device)
    if protocol == "didemo":
        _, pv = model.candidates(v.unsqueeze(0))
        return pv[0], didemo_intervals()[0]
    wins = benchmark_windows(protocol, float(duration))
    T = v.shape[0]
    ranges = torch.tensor([window_snippet_range(a, b, float(duration), T) for a, b in wins], device=device)
    return model.scorer.project_windows(v, ranges), np.asarray(wins, dtype=np.float64)


def read_split(model, source: ShardSource, protocol: str, device, verify: bool = True,
               skip_videos: set | None = None) -> tuple[Corpus, CorpusQueries]:
    """Every video of the shards projected into a Corpus, and every query's truth (videos in shard order)."""
    videos, durations, pvs, vidx, secs = [], [], [], [], []
    ids, sentences, texts, qvideo, moments = [], [], [], [], []
    last, skipping = None, False
    for url, sha in zip(source.urls, source.shas):
        for q in expand_queries(iter_shard(url, source.manifest, sha if verify else None, source.read_timeout_s)):
            m = q["meta"]
            if q["video"] is not last:  # the queries of one video share its array (expand_queries)
                last = q["video"]
                skipping = skip_videos is not None and m["video"] in skip_videos
                if skipping:
                    continue
                pv, s = video_candidates(model, q["video"], m["duration"], protocol, device)
                videos.append(m["video"])
                durations.append(float(m["duration"]))
                pvs.append(pv.float().cpu())
                vidx.append(np.full(len(s), len(videos) - 1))
                secs.append(s)
            if skipping:
                continue
            ids.append(m["query_id"])
            sentences.append(m.get("query", ""))
            texts.append(np.asarray(q["text"], dtype=np.float32))
            qvideo.append(len(videos) - 1)
            if protocol == "didemo":
                s, e = DIDEMO_CANDIDATES[majority_candidate(m["times"])]
                moments.append((s, e + 1))
            else:
                moments.append(tuple(float(x) for x in m["times"][0]))  # [[start, end]] in seconds
    sec = np.concatenate(secs) if secs else np.zeros((0, 2))
    corpus = Corpus(videos, durations, torch.cat(pvs) if pvs else torch.zeros(0, 0), np.concatenate(vidx) if vidx
                    else np.zeros(0, int), sec[:, 0], sec[:, 1], protocol == "didemo")
    if protocol == "didemo" and len(sec):
        grid = np.tile(didemo_intervals()[1], (len(videos), 1))
        corpus.iou_starts, corpus.iou_ends = grid[:, 0], grid[:, 1]
    queries = CorpusQueries(ids, sentences, np.stack(texts) if texts else np.zeros((0, 0), np.float32),
                            np.asarray(qvideo, dtype=np.int64), np.asarray(moments, dtype=np.float64).reshape(-1, 2))
    return corpus, queries

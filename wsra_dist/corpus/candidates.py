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
from ..data.records import DataError
from ..data.loader import ShardSource, expand_queries
from ..data.shards import iter_shard
from ..geometry import DIDEMO_CANDIDATES, benchmark_windows, window_snippet_range
from ..scale_calibration import WITHIN_VIDEO
from .store import DenseStore, DidemoChunkStore, SnippetStore


@dataclass
class Corpus:
    """Candidates of many videos: their projections (a store.py layout) and, per candidate, its video and interval."""

    videos: list[str]
    durations: list[float]
    store: DenseStore | DidemoChunkStore | SnippetStore  # W_v x + b of every candidate (or snippet), video order
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

    @property
    def valid(self) -> np.ndarray | None:
        """(M,) bool: candidates that lie inside their video, or None when all do.  DiDeMo stores all 21 chunk
        spans of every video (the parts layout needs them), but a 25-s video has 5 chunks: the spans that reach
        its 6th are not moments of the video, so search and the corpus protocol never rank them."""
        if getattr(self, "_valid", False) is False:
            dur = np.asarray(self.durations, dtype=np.float64)[self.video_of] if self.size else np.zeros(0)
            ok = self.ends <= dur + 1e-6
            self._valid = None if ok.all() else ok
        return self._valid

    def valid_mask(self, device) -> torch.Tensor | None:
        """`valid` as a tensor on `device`, built once per device (search masks every query with it)."""
        if self.valid is None:
            return None
        cache = self.__dict__.setdefault("_valid_masks", {})
        key = str(device)
        if key not in cache:
            cache[key] = torch.as_tensor(self.valid, device=device)
        return cache[key]

    @property
    def n_valid(self) -> int:
        return self.size if self.valid is None else int(self.valid.sum())

    def groups(self, protocol: str) -> np.ndarray:
        """(M,) window size of every candidate (scale_calibration.window_groups; DiDeMo: chunks - 1)."""
        from ..scale_calibration import DIDEMO_GROUPS, window_groups

        if getattr(self, "_groups", None) is None:
            if protocol == "didemo":
                self._groups = np.tile(np.asarray(DIDEMO_GROUPS), len(self.videos))
            else:
                self._groups = np.concatenate([window_groups(protocol, d).numpy() for d in self.durations]) \
                    if self.videos else np.zeros(0, int)
            if len(self._groups) != self.size:
                raise DataError("the corpus's candidates are not the protocol's windows (cannot calibrate them)")
        return self._groups

    def to(self, device) -> "Corpus":
        return Corpus(self.videos, self.durations, self.store.to(device), self.video_of, self.starts, self.ends,
                      self.grid, self.iou_starts, self.iou_ends)

    @classmethod
    def didemo(cls, videos: list[str], durations: list[float], store) -> "Corpus":
        """A DiDeMo corpus: 21 chunk spans per video, IoU on the chunk grid."""
        secs, grid = didemo_intervals()
        V = len(videos)
        return cls(videos, durations, store, np.repeat(np.arange(V), len(secs)), np.tile(secs[:, 0], V),
                   np.tile(secs[:, 1], V), True, np.tile(grid[:, 0], V), np.tile(grid[:, 1], V))


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


def corpus_ranking(model) -> str | None:
    """Across videos a checkpoint ranks by φ's logit (DiDeMo: with chunk consistency) or, under standardise, per
    window size; its within-video `contrast` is not used here: inside − λ·outside is not comparable between videos
    (a video whose snippets all score low gains λ times its low outside mean).  Measured on activitynet-real
    (λ 16): R@10 at IoU 0.5 0.00 against 1.63 with φ; charades-real (λ 1) 3.40 against 4.87 (docs/method.md).
    Returns what was set aside (for the table's label), or None."""
    mode = getattr(model, "scale_calibration", "none")
    if mode in WITHIN_VIDEO:  # span too: a mass standardised within one video is not comparable across videos
        model.scale_calibration = "none"
        return mode
    return None


def contrast_layout(model, protocol: str) -> bool:
    """Windows ranked by the inside-vs-outside contrast of their snippets need the snippets, not the windows."""
    return protocol != "didemo" and getattr(model, "scale_calibration", "none") == "contrast"


def chunk_layout(model, protocol: str) -> bool:
    """DiDeMo candidates are stored as per-video parts unless φ's input norm is LayerNorm (not linear in them)."""
    return protocol == "didemo" and model.didemo is not None and model.scorer.cfg.input_norm != "layernorm"


@torch.inference_mode()
def video_candidates(model, video: np.ndarray, duration: float, protocol: str, device):
    """(projections (C, H) or, for the chunk layout, didemo_parts of the one video, seconds (C, 2))."""
    v = torch.as_tensor(np.asarray(video, dtype=np.float32), device=device)
    if protocol == "didemo":
        if chunk_layout(model, protocol):
            return model.scorer.didemo_parts(v.unsqueeze(0), model.didemo.modality_dims, model.didemo.tef), \
                didemo_intervals()[0]
        _, pv = model.candidates(v.unsqueeze(0))
        return pv[0], didemo_intervals()[0]
    wins = benchmark_windows(protocol, float(duration))
    T = v.shape[0]
    ranges = torch.tensor([window_snippet_range(a, b, float(duration), T) for a, b in wins], device=device)
    if contrast_layout(model, protocol):
        return {"snippets": model.scorer.project_video(v), "ranges": ranges}, np.asarray(wins, dtype=np.float64)
    return model.scorer.project_windows(v, ranges), np.asarray(wins, dtype=np.float64)


class CorpusBuilder:
    """Accumulates videos' candidates (video_candidates) into a Corpus."""

    def __init__(self, model, protocol: str):
        self.model, self.protocol = model, protocol
        self.videos: list[str] = []
        self.durations: list[float] = []
        self.pvs: list = []
        self.secs: list[np.ndarray] = []

    def add(self, name: str, duration: float, cand, secs: np.ndarray) -> None:
        self.videos.append(name)
        self.durations.append(float(duration))
        self.pvs.append({k: (x.float() if x.is_floating_point() else x).cpu() for k, x in cand.items()}
                        if isinstance(cand, dict) else cand.float().cpu())
        self.secs.append(np.asarray(secs, dtype=np.float64))

    def corpus(self) -> Corpus:
        if contrast_layout(self.model, self.protocol):
            return self._snippet_corpus()
        if chunk_layout(self.model, self.protocol):
            H = self.model.scorer.cfg.hidden
            M = len(self.model.didemo.modality_dims)
            cat = (lambda k, shape: torch.cat([p[k] for p in self.pvs]) if self.pvs else torch.zeros(shape))
            parts = {"g": cat("g", (0, H)), "local": cat("local", (0, M, 6, H)), "den": cat("den", (0, 21, M)),
                     "norm": cat("norm", (0, 21)),
                     "tef": self.pvs[0]["tef"] if self.pvs else torch.zeros(21, H)}
            store = DidemoChunkStore.from_parts(parts, self.model.scorer.proj_v.bias.detach().float().cpu())
            return Corpus.didemo(self.videos, self.durations, store)
        sec = np.concatenate(self.secs) if self.secs else np.zeros((0, 2))
        vidx = [np.full(len(s), i) for i, s in enumerate(self.secs)]
        store = DenseStore(torch.cat(self.pvs) if self.pvs else torch.zeros(0, self.model.scorer.cfg.hidden))
        corpus = Corpus(self.videos, self.durations, store, np.concatenate(vidx) if vidx else np.zeros(0, int),
                        sec[:, 0], sec[:, 1], self.protocol == "didemo")
        if self.protocol == "didemo" and len(sec):
            grid = np.tile(didemo_intervals()[1], (len(self.videos), 1))
            corpus.iou_starts, corpus.iou_ends = grid[:, 0], grid[:, 1]
        return corpus

    def _snippet_corpus(self) -> Corpus:
        H = self.model.scorer.cfg.hidden
        counts = torch.tensor([p["snippets"].shape[0] for p in self.pvs], dtype=torch.long)
        first = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)[:-1]]) if len(counts) else counts
        n_win = [p["ranges"].shape[0] for p in self.pvs]
        store = SnippetStore(torch.cat([p["snippets"] for p in self.pvs]) if self.pvs else torch.zeros(0, H), first,
                             counts, torch.cat([p["ranges"].long() for p in self.pvs]) if self.pvs
                             else torch.zeros(0, 2, dtype=torch.long),
                             torch.repeat_interleave(torch.arange(len(n_win)), torch.tensor(n_win, dtype=torch.long)))
        sec = np.concatenate(self.secs) if self.secs else np.zeros((0, 2))
        return Corpus(self.videos, self.durations, store, store.cand_video.numpy().astype(np.int64), sec[:, 0],
                      sec[:, 1], False)


def read_split(model, source: ShardSource, protocol: str, device, verify: bool = True,
               skip_videos: set | None = None) -> tuple[Corpus, CorpusQueries]:
    """Every video of the shards projected into a Corpus, and every query's truth (videos in shard order)."""
    build = CorpusBuilder(model, protocol)
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
                build.add(m["video"], m["duration"], *video_candidates(model, q["video"], m["duration"], protocol, device))
            if skipping:
                continue
            ids.append(m["query_id"])
            sentences.append(m.get("query", ""))
            texts.append(np.asarray(q["text"], dtype=np.float32))
            qvideo.append(len(build.videos) - 1)
            if protocol == "didemo":
                s, e = DIDEMO_CANDIDATES[majority_candidate(m["times"])]
                moments.append((s, e + 1))
            else:
                moments.append(tuple(float(x) for x in m["times"][0]))  # [[start, end]] in seconds
    queries = CorpusQueries(ids, sentences, np.stack(texts) if texts else np.zeros((0, 0), np.float32),
                            np.asarray(qvideo, dtype=np.int64), np.asarray(moments, dtype=np.float64).reshape(-1, 2))
    return build.corpus(), queries

"""Moment geometry shared by data, model and evaluation: DiDeMo's 21 chunk pairs (and their features
from the 6 chunks) and WSRA's proportional sliding windows over snippets (Charades-STA).

numpy versions build features the way the reference code does (float64); the torch versions are the
same functions on batches, used by the model as the materialised reference of its projected path."""

from __future__ import annotations

import functools

import itertools
import math

import numpy as np
import torch

# utils/data_processing.py order: the 6 single chunks, then combinations(range(6), 2).  Carry
# candidates as (s, e) pairs, never as positions: other code uses other orders.
DIDEMO_CANDIDATES: list[tuple[int, int]] = [(i, i) for i in range(6)] + list(itertools.combinations(range(6), 2))


def _norm(x: np.ndarray) -> np.ndarray:
    m = x.mean(0)
    return m / (np.linalg.norm(m) + 1e-5)


def didemo_candidate_features(chunks: np.ndarray, tef: bool = False) -> np.ndarray:
    """(6, D) chunk features -> (21, 2D [+2]): concat(global, local [, TEF]) as in the reference code."""
    chunks = np.asarray(chunks, dtype=np.float64)
    g = _norm(chunks)
    rows = []
    for s, e in DIDEMO_CANDIDATES:
        parts = [g, _norm(chunks[s : e + 1])]
        if tef:
            parts.append(np.array([s / 6.0, e / 6.0]))
        rows.append(np.concatenate(parts))
    return np.stack(rows).astype(np.float32)


def proportional_windows(
    duration: float, fractions: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5), overlap: float = 0.8
) -> np.ndarray:
    """Windows of each fraction of the duration, stride (1 - overlap) x length; (W, 2) seconds."""
    out = []
    for f in fractions:
        w = f * duration
        stride = (1.0 - overlap) * w
        n = int(math.floor((duration - w) / stride + 1e-6)) + 1 if stride > 0 else 1
        out += [(k * stride, k * stride + w) for k in range(n)]
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


# Inference windows of the snippet benchmarks: (fractions of the video's length, overlap).  Charades-STA: the
# paper's.  ActivityNet Captions (long moments: 35 % of the video on average, a tenth above 80 %): sizes
# doubling from 20 % to 80 % plus the whole video, stride a quarter of the window, so every size tiles the
# video from 0 to its end (27 windows).  No 10 % windows: trained models rank the smallest windows first
# (a window inside the moment holds its signature undiluted), and 10 % windows then cap the IoU of long
# moments.  docs/method.md: the measurements and val_2's exact chance and oracle rows.
BENCHMARK_WINDOWS: dict[str, tuple[tuple[float, ...], float]] = {
    "charades": ((0.2, 0.3, 0.4, 0.5), 0.8),
    "activitynet": ((0.2, 0.4, 0.8, 1.0), 0.75),
}


def benchmark_windows(benchmark: str | None, duration: float) -> np.ndarray:
    """The inference windows (W, 2) seconds of a snippet benchmark; Charades-STA's for any other name
    (checkpoints written before the benchmark was recorded are Charades-STA ones)."""
    fractions, overlap = BENCHMARK_WINDOWS.get(benchmark or "charades", BENCHMARK_WINDOWS["charades"])
    return proportional_windows(duration, fractions, overlap)


def window_snippet_range(start: float, end: float, duration: float, T: int) -> tuple[int, int]:
    """Snippets k with [k, k+1) * duration / T overlapping [start, end); at least one."""
    a = int(math.floor(start / duration * T + 1e-9))
    b = int(math.ceil(end / duration * T - 1e-9))
    a = min(max(a, 0), T - 1)
    return a, max(min(b, T), a + 1)


def window_features(snippets: np.ndarray, windows: np.ndarray, duration: float) -> np.ndarray:
    """Mean of the snippets inside each window: (T, D) x (W, 2) -> (W, D)."""
    T = snippets.shape[0]
    csum = np.concatenate([np.zeros((1, snippets.shape[1])), np.cumsum(snippets, 0, dtype=np.float64)])
    out = np.empty((len(windows), snippets.shape[1]), dtype=np.float32)
    for i, (s, e) in enumerate(windows):
        a, b = window_snippet_range(s, e, duration, T)
        out[i] = (csum[b] - csum[a]) / (b - a)
    return out


def didemo_pooling_matrix(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """(21, 6) rows averaging the chunks of each candidate (s..e inclusive), in DIDEMO_CANDIDATES order.
    Built once per (dtype, device) and shared: read-only (a step builds no constants: CUDA graphs, launches)."""
    return _pooling(dtype, torch.device(device))


@functools.lru_cache(maxsize=32)
def _pooling(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    a = torch.zeros(len(DIDEMO_CANDIDATES), 6, dtype=dtype, device=device)
    for i, (s, e) in enumerate(DIDEMO_CANDIDATES):
        a[i, s : e + 1] = 1.0 / (e - s + 1)
    return a


def didemo_chunk_min(logits: torch.Tensor) -> torch.Tensor:
    """(..., 21) candidate logits -> (..., 21): for each candidate (s, e), the lowest logit among the
    single-chunk candidates (k, k), s <= k <= e (DIDEMO_CANDIDATES puts (k, k) at position k)."""
    inside = didemo_pooling_matrix(logits.dtype, logits.device) > 0  # (21, 6)
    single = logits[..., :6].unsqueeze(-2)  # (..., 1, 6)
    return single.masked_fill(~inside, float("inf")).amin(-1)


def didemo_tef(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """(21, 2) temporal endpoint features [s/6, e/6] of the candidates (cached like didemo_pooling_matrix)."""
    return _tef(dtype, torch.device(device))


@functools.lru_cache(maxsize=32)
def _tef(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor([[s / 6.0, e / 6.0] for s, e in DIDEMO_CANDIDATES], dtype=dtype, device=device)


def didemo_candidates_from_chunks(chunks: torch.Tensor, modality_dims: tuple[int, ...], tef: bool = False) -> torch.Tensor:
    """Batched `didemo_candidate_features`: (b, 6, ΣD) chunks, modalities side by side -> (b, 21, 2ΣD [+2]).

    Per modality concat(global mean / (|.| + 1e-5), candidate mean / (|.| + 1e-5)); TEF once at the end.
    The global mean is over all 6 chunks (zero rows past the video's end included), as in the reference code.
    """
    if chunks.shape[-2] != 6 or chunks.shape[-1] != sum(modality_dims):
        raise ValueError(f"DiDeMo chunks of shape {tuple(chunks.shape)}, expected (..., 6, {sum(modality_dims)})")
    a = didemo_pooling_matrix(chunks.dtype, chunks.device)
    parts, off = [], 0
    for d in modality_dims:
        c = chunks[..., off : off + d]
        off += d
        g = c.mean(-2, keepdim=True)
        g = g / (g.norm(dim=-1, keepdim=True) + 1e-5)
        loc = a @ c
        loc = loc / (loc.norm(dim=-1, keepdim=True) + 1e-5)
        parts += [g.expand_as(loc), loc]
    if tef:
        parts.append(didemo_tef(chunks.dtype, chunks.device).expand(*chunks.shape[:-2], -1, -1))
    return torch.cat(parts, dim=-1)


def didemo_input_dim(modality_dims: tuple[int, ...], tef: bool) -> int:
    return 2 * sum(modality_dims) + (2 if tef else 0)

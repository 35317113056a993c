"""Window-scale calibration with no timestamps (`model.scale_calibration`, issue #26): pure tensor functions.

A weak learner never sees a moment, so it cannot learn which window sizes the annotators prefer.  What it has
are its own scores of the training queries against every candidate window of their own (unlabelled) training
videos.  `standardise` uses them: per window size g (DiDeMo: the chunk length 1-6 of the 21 candidates;
Charades-STA / ActivityNet: the fraction of the video, one per size of the benchmark's window set) the mean μ_g
and the standard deviation σ_g of the ranking logits over those (query, window) pairs, and candidates are then
ranked by (logit − μ_g) / σ_g, so each size is judged against its own typical score (a small window's mean of few
snippets is more extreme both ways than a long window's).  No timestamps enter: the statistics are over all
windows of a video, inside or outside any moment.

`contrast` (snippet benchmarks) ranks a window by what it leaves out instead: the mean of its snippets' logits
minus λ (`model.contrast_weight`) times the mean of the logits of the snippets outside it (the whole video has no
outside: its outside mean is taken as the video's mean), so a window is good when the query's snippets are inside
it and not outside, whatever its size.  It needs no statistics.

`span` (snippet benchmarks) does not stop at the benchmark's window set: the query's snippet logits are
standardised over the video's snippets (z, no timestamps, no statistics), each window scores its mass
Σ_{t in window} (z_t − θ) (θ = `model.span_threshold`, in standard deviations), and the contiguous span of
highest mass (found exactly, `best_span`) joins the candidates, so it ranks first.  A window gains by holding
the snippets above θ and loses by each one below it: its length follows the query's evidence, not a fixed set
of sizes (docs/method.md, "Span ranking").  With a band w > 0 (`model.span_band`) the span's two edges are the
means of the best spans' edges at BAND_POINTS thresholds evenly spread over [θ − w, θ + w], in fractional
snippets (one θ is a hard cut; the band trades exact edges for steadier ones: measured in docs/method.md).

Everything here is a function of tensors (no model, no files): `window_groups` / `DIDEMO_GROUPS` name each
candidate's size, `accumulate` / `finish` build the statistics in float64 over any number of batches,
`standardise` applies them.  The evaluation layer (`evaluation/calibration.py`) scores the training split and
stores the statistics beside the weights (JSON).
"""

from __future__ import annotations

import numpy as np
import torch

from .geometry import BENCHMARK_WINDOWS, DIDEMO_CANDIDATES

MODES = ("none", "standardise", "contrast", "span")
WITHIN_VIDEO = ("contrast", "span")  # from one video's snippets alone: not comparable across videos
NEEDS_STATS = ("standardise",)
STATS_FORMAT = "wsra-dist-scale-calibration/1"
BAND_POINTS = 9  # thresholds averaged over by span ranking's band (model.span_band)

# DiDeMo: group of each of the 21 candidates = its number of chunks - 1 (0..5).
DIDEMO_GROUPS: tuple[int, ...] = tuple(e - s for s, e in DIDEMO_CANDIDATES)


def check_mode(v, name: str = "model.scale_calibration") -> str:
    if v not in MODES:
        raise ValueError(f"{name} must be one of {', '.join(MODES)}, got {v!r}")
    return str(v)


def n_groups(benchmark: str | None) -> int:
    """How many window sizes a benchmark's candidate set has."""
    if benchmark == "didemo":
        return 6
    fractions, _ = BENCHMARK_WINDOWS.get(benchmark or "charades", BENCHMARK_WINDOWS["charades"])
    return len(fractions)


def window_groups(benchmark: str | None, duration: float) -> torch.Tensor:
    """(W,) size index of each window `geometry.benchmark_windows(benchmark, duration)` returns, in its order
    (DiDeMo: DIDEMO_GROUPS).  The windows of a size are consecutive there; counted the same way here."""
    if benchmark == "didemo":
        return torch.tensor(DIDEMO_GROUPS, dtype=torch.long)
    from .geometry import proportional_windows

    fractions, overlap = BENCHMARK_WINDOWS.get(benchmark or "charades", BENCHMARK_WINDOWS["charades"])
    counts = [len(proportional_windows(duration, (f,), overlap)) for f in fractions]
    return torch.from_numpy(np.repeat(np.arange(len(fractions)), counts)).long()


def empty_stats(groups: int) -> torch.Tensor:
    """(groups, 3) float64 running sums: count, Σ logit, Σ logit²."""
    return torch.zeros(groups, 3, dtype=torch.float64)


def accumulate(acc: torch.Tensor, logits: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Add logits (..., W) of windows with sizes `groups` (W,) or (..., W) to the sums `acc` (G, 3); entries where
    `mask` is False (padding) or that are not finite are left out.  Returns a new tensor."""
    x = logits.detach().to(torch.float64).cpu()
    g = groups.cpu().long().expand_as(x)
    keep = torch.isfinite(x)
    if mask is not None:
        keep &= mask.cpu().bool().expand_as(x)
    x, g = x[keep], g[keep]
    G = acc.shape[0]
    if g.numel() and (int(g.min()) < 0 or int(g.max()) >= G):
        raise ValueError(f"window size index out of range 0..{G - 1}")
    add = torch.stack([torch.bincount(g, minlength=G).double(), torch.bincount(g, x, minlength=G),
                       torch.bincount(g, x * x, minlength=G)], 1)
    return acc + add


def finish(acc: torch.Tensor, min_sd: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ (G,), σ (G,)) float64 from the sums (population sd, at least `min_sd`).  A size never seen gets μ 0, σ 1
    (its logits pass unchanged)."""
    n, s, ss = acc[:, 0], acc[:, 1], acc[:, 2]
    seen = n > 0
    mu = torch.where(seen, s / n.clamp(min=1), torch.zeros_like(s))
    var = torch.where(seen, ss / n.clamp(min=1) - mu * mu, torch.ones_like(s))
    return mu, var.clamp(min=0).sqrt().clamp(min=min_sd)


def standardise(logits: torch.Tensor, groups: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    """(logit − μ_g) / σ_g per window, in float64: (..., W) with sizes `groups` (W,) or (..., W)."""
    g = groups.to(logits.device).long()
    m, s = mu.to(logits.device, torch.float64), sd.to(logits.device, torch.float64)
    return (logits.to(torch.float64) - m[g]) / s[g]


def inside_outside(snippet_logits: torch.Tensor, ranges: torch.Tensor, weight: float) -> torch.Tensor:
    """(W,) float64 mean logit of the snippets [a, b) inside each window minus `weight` x the mean logit of the
    snippets outside it (empty outside: the mean of all T snippets); snippet_logits (T,), ranges (W, 2)."""
    x = snippet_logits.to(torch.float64)
    T = x.shape[0]
    c = torch.nn.functional.pad(x.cumsum(0), (1, 0))
    a, b = ranges[:, 0].long().to(x.device), ranges[:, 1].long().to(x.device)
    n = (b - a).to(torch.float64)
    inside = c[b] - c[a]
    rest = T - n
    out = torch.where(rest > 0, (c[T] - inside) / rest.clamp(min=1), c[T] / T)
    return inside / n - float(weight) * out


def best_span(x: torch.Tensor) -> tuple[int, int]:
    """[a, b) with the largest Σ_{t in [a, b)} x_t over all non-empty contiguous ranges of x (T,) (Kadane's
    maximum through prefix sums: c[b] − min_{a<b} c[a]); the first such b, the last a reaching its minimum."""
    c = torch.nn.functional.pad(x.to(torch.float64).cumsum(0), (1, 0))
    low = torch.cummin(c[:-1], 0)
    b = int(torch.argmax(c[1:] - low.values)) + 1
    return int(low.indices[b - 1]), b


def band_span(z: torch.Tensor, band: float) -> torch.Tensor:
    """(2,) float64 [a, b) in fractional snippets: best_span of z − θ' averaged over BAND_POINTS thresholds θ'
    evenly spread over [−band, band] (z already less the centre θ); band 0: best_span of z."""
    if band <= 0:
        return torch.tensor(best_span(z), dtype=torch.float64)
    offsets = torch.linspace(-float(band), float(band), BAND_POINTS, dtype=torch.float64).tolist()
    return torch.tensor([best_span(z - o) for o in offsets], dtype=torch.float64).mean(0)


def span_values(snippet_logits: torch.Tensor, ranges: torch.Tensor, threshold: float,
                band: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (1 + W,) float64, span (2,) float64) of `span` ranking for one query: snippet_logits (T,), ranges
    (W, 2) [a, b) snippet indices of the benchmark's windows.  Value = Σ_{t in [a, b)} (z_t − threshold) / T with
    z the logits standardised over the T snippets.  values[0] is the best span's (band > 0: `band_span`'s edges,
    fractional; valued at the highest value, so it still ranks first), values[1:] the windows'; a window on the
    span's very snippets (its edges rounded) is -inf (its seconds differ from the span's only inside the edge
    snippets, so it is the same candidate again: left out, and the span ranks first even among equal masses)."""
    x = snippet_logits.to(torch.float64)
    T = x.shape[0]
    sd = x.std(unbiased=False) if T > 1 else x.new_zeros(())
    z = (x - x.mean()) / sd.clamp_min(1e-12) - float(threshold)
    span = band_span(z.cpu(), band)
    cells = span.round().long()
    cells[1] = torch.clamp(torch.maximum(cells[1], cells[0] + 1), max=T)  # a band's mean span of < 1 snippet
    cells[0] = torch.minimum(cells[0], cells[1] - 1)
    r = torch.cat([cells.unsqueeze(0), ranges.long().cpu()]).to(x.device)
    c = torch.nn.functional.pad(z.cumsum(0), (1, 0))
    values = (c[r[:, 1]] - c[r[:, 0]]) / T
    same = torch.cat([torch.zeros(1, dtype=torch.bool), (ranges.long().cpu() == cells).all(1)]).to(x.device)
    values = values.masked_fill(same, float("-inf"))
    values[0] = values.max()  # ties: a stable sort keeps the span (position 0) first
    return values, span


def calibrate(mode: str, logits: torch.Tensor, groups: torch.Tensor, stats: dict | None) -> torch.Tensor:
    """What candidates are ranked by under `mode` ("none": the logits unchanged)."""
    if mode in ("none", "contrast", "span"):  # contrast, span: the logits are already their values
        return logits
    if stats is None:
        raise ValueError(f"scale_calibration {mode!r} needs the training statistics (evaluation/calibration.py)")
    return standardise(logits, groups, stats["mu"], stats["sd"])


def stats_to_json(mu: torch.Tensor, sd: torch.Tensor, count: torch.Tensor, **extra) -> dict:
    return {"format": STATS_FORMAT, "mu": [float(x) for x in mu], "sd": [float(x) for x in sd],
            "count": [int(x) for x in count], **extra}


def stats_from_json(d: dict) -> dict:
    if str(d.get("format", "")).split("/")[0] != STATS_FORMAT.split("/")[0]:
        raise ValueError(f"not scale-calibration statistics (format {d.get('format')!r}, expected {STATS_FORMAT})")
    mu, sd = torch.tensor(d["mu"], dtype=torch.float64), torch.tensor(d["sd"], dtype=torch.float64)
    if mu.shape != sd.shape or mu.ndim != 1 or not (torch.isfinite(mu).all() and (sd > 0).all()):
        raise ValueError("scale-calibration statistics need equal-length finite mu and positive sd lists")
    return {**d, "mu": mu, "sd": sd}

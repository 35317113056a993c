"""WSRA losses (Eq. 3-8) and the top/last-K sampler: pure functions of tensors.

Every function takes the *global* batch (all queries, all videos' pooled features, gathered by the
caller) plus which rows are local (a slice), and returns the local *share* of the loss.  Summing the
shares over processes gives the loss of one process holding the whole batch:

* decomposable terms (L_snippet, the cross-video variant, the supervised reference) are sums over
  videos, so the share is the sum over the local rows (divided by the global count for a mean);
* terms with one log over the whole batch (L_video, L_batch) are not decomposable; every process
  computes the full value from gathered inputs and keeps n_local / N of it.

No torch.distributed here: the distributed layer only gathers inputs and scales the total.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossConfig:
    w_video: float = 0.1  # α in Eq. 8
    w_snippet: float = 1.0  # β in Eq. 8
    w_batch: float = 0.1  # δ in Eq. 8
    w_cross: float = 0.0  # variant: cross-video foreground term (docs/method.md)
    w_supervised: float = 0.0  # fully supervised reference (uses annotated times)
    tau: float = 1.0  # τ of Eq. 3, 5, 7
    margin: float = 0.1  # m of Eq. 3, 5, 7
    cross_tau: float = 5.0
    cross_margin: float = 0.2
    cross_negatives: str = "all"  # all | hard: which other-video queries the variant contrasts
    k_top: int = 3
    k_last: int = 2
    self_in_top_k: bool = False  # does the query itself take one of the K_top slots?
    snippet_negatives: str = "mean"  # mean | sum | in_log: how L_snippet combines hard negatives
    # mean | sum: how L_snippet combines videos.  Eq. 8 sums over videos (`sum`); `mean` (default) divides
    # that sum by N, a deviation that weights L_snippet N x less than the paper (docs/method.md measures both).
    snippet_videos: str = "mean"
    gamma_denominator: str = "all"  # all | others: Eq. 6's Σ_j over every query or other videos only
    beta_normalize: bool = False  # variant: β x N (mean weight 1 instead of 1/N) in Eq. 5

    def validate(self) -> None:
        for name, allowed in (
            ("snippet_negatives", ("mean", "sum", "in_log")),
            ("snippet_videos", ("mean", "sum")),
            ("gamma_denominator", ("all", "others")),
            ("cross_negatives", ("all", "hard")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"loss.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.k_top < 0 or self.k_last < 0:
            raise ValueError(f"loss.k_top and loss.k_last must be >= 0, got {self.k_top}, {self.k_last}")


def log1p_sum_exp(z: torch.Tensor, valid: torch.Tensor | None = None, dim: int | tuple = -1) -> torch.Tensor:
    """log(1 + Σ exp(z)) over `dim`, computed as a log-sum-exp with a zero term (stable)."""
    if valid is not None:
        z = z.masked_fill(~valid, float("-inf"))
    dims = tuple(d % z.dim() for d in ((dim,) if isinstance(dim, int) else dim))
    m = z.detach().amax(dim=dims, keepdim=True).clamp_min(0.0)  # the zero term bounds m below
    out = m + torch.log(torch.exp(z - m).sum(dim=dims, keepdim=True) + torch.exp(-m))
    return out.squeeze(dims)


def _share(total: torch.Tensor, local: slice, n_global: int) -> torch.Tensor:
    n_local = len(range(*local.indices(n_global)))
    return total * (n_local / n_global)


# --------------------------------------------------------------------------------------------
# Top/last-K sampling (section 3.2.1)
# --------------------------------------------------------------------------------------------
@dataclass
class Negatives:
    hard: torch.Tensor  # (N, N) bool: query j is a hard negative of sample i
    pseudo: torch.Tensor  # (N, N) bool: query j was removed as a pseudo-positive (top K)
    easy: torch.Tensor  # (N, N) bool: query j was removed as an easy negative (last K)
    pseudo_positive: torch.Tensor  # (N,) long: the most similar other-video query (Eq. 6's t+)


def sample_negatives(
    text_sim: torch.Tensor,
    video_ids: torch.Tensor,
    k_top: int,
    k_last: int,
    self_in_top_k: bool = False,
    check: bool = True,
) -> Negatives:
    """Rank each query's other-video queries by text similarity, drop the top K_top and last K_last.

    Queries of the same video (the query itself included) are never candidates.  Ties keep the
    batch order (stable sort), so every process makes the same choice.  With `self_in_top_k`
    the query itself fills one of the K_top slots, so only K_top - 1 other queries are removed.
    `check=False` skips the too-small-batch check (it reads a value on the host); the caller has decided it.
    """
    n = text_sim.shape[0]
    same = video_ids[:, None] == video_ids[None, :]
    n_cand = n - same.sum(1)  # (N,)
    k_top_eff = max(k_top - 1, 0) if self_in_top_k else k_top
    n_hard = n_cand - k_top_eff - k_last
    if n == 0 or (check and int(n_hard.min()) < 1):
        i = int(n_hard.argmin()) if n else 0
        raise ValueError(
            f"global batch too small for top/last-K sampling: {n} queries, K_top={k_top}, K_last={k_last}; "
            f"query {i} has {int(n_cand[i]) if n else 0} queries of other videos, leaving "
            f"{int(n_hard[i]) if n else 0} hard negatives (need >= 1). Raise the batch size or lower K."
        )
    # Same-video entries sort first (+inf), so candidate rank = position - (#same-video).
    key = text_sim.masked_fill(same, float("inf"))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    pos = torch.empty_like(order)
    pos.scatter_(1, order, torch.arange(n, device=order.device).expand(n, n))
    rank = pos - same.sum(1, keepdim=True)  # 0-based rank among candidates; negative for same-video
    cand = ~same
    pseudo = cand & (rank < k_top_eff)
    easy = cand & (rank >= (n_cand - k_last).unsqueeze(1))
    hard = cand & ~pseudo & ~easy
    first = order.gather(1, same.sum(1, keepdim=True)).squeeze(1)
    return Negatives(hard=hard, pseudo=pseudo, easy=easy, pseudo_positive=first)


# --------------------------------------------------------------------------------------------
# Eq. 3: video-level loss
# --------------------------------------------------------------------------------------------
def video_loss(s_pos: torch.Tensor, s_neg: torch.Tensor, local: slice, tau: float, margin: float) -> torch.Tensor:
    """L_video = log[1 + Σ_i exp(τ(s_n^i - s_p^i + m))], s_p = φ(v_f^i, t^i), s_n = φ(v_b^i, t^i)."""
    total = log1p_sum_exp(tau * (s_neg - s_pos + margin), dim=0)
    return _share(total, local, s_pos.shape[0])


# --------------------------------------------------------------------------------------------
# Eq. 4-5: snippet-level loss with β weights
# --------------------------------------------------------------------------------------------
def snippet_beta(phi_all: torch.Tensor) -> torch.Tensor:
    """Eq. 4: β_t^j(i) = exp φ(v_t^j, t^i) / Σ_i' exp φ(v_t^j, t^i') over all N queries; (b, T, N)."""
    return torch.softmax(phi_all, dim=-1)


def snippet_loss(
    phi_all: torch.Tensor,
    mask: torch.Tensor,
    positive: torch.Tensor,
    hard: torch.Tensor,
    n_global: int,
    tau: float,
    margin: float,
    negatives: str = "mean",
    videos: str = "mean",
    beta_normalize: bool = False,
) -> torch.Tensor:
    """Eq. 5 for the local videos: log[1 + Σ_t exp(τ(β⁺_t s_n^t - β⁻_t s_p^t + m))] per (video, negative).

    phi_all (b, T, N): φ of each local snippet with every global query; mask (b, T); positive (b,)
    global index of each video's own query; hard (b, N) hard-negative mask from the sampler.
    """
    beta = snippet_beta(phi_all)
    if beta_normalize:  # β ≈ 1/N flattens Eq. 5's exponent; N·β has mean 1 (docs/method.md)
        beta = beta * phi_all.shape[-1]
    idx = positive.view(-1, 1, 1).expand(-1, phi_all.shape[1], 1)
    s_p = phi_all.gather(2, idx)  # (b, T, 1)
    b_p = beta.gather(2, idx)
    z = tau * (b_p * phi_all - beta * s_p + margin)  # column n: β⁺ s_n - β⁻ s_p + m
    valid = mask.unsqueeze(-1) & hard.unsqueeze(1)  # (b, T, N)
    if negatives == "in_log":
        per_video = log1p_sum_exp(z, valid, dim=(1, 2))
    else:
        per_pair = log1p_sum_exp(z, valid, dim=1)  # (b, N)
        per_pair = per_pair.masked_fill(~hard, 0.0)
        per_video = per_pair.sum(1)
        if negatives == "mean":
            per_video = per_video / hard.sum(1).clamp_min(1)
    total = per_video.sum()
    return total / n_global if videos == "mean" else total


# --------------------------------------------------------------------------------------------
# Eq. 6-7: batch-level loss with γ weights over pseudo-positives
# --------------------------------------------------------------------------------------------
def batch_gamma(
    text_cos: torch.Tensor, pseudo_positive: torch.Tensor, video_ids: torch.Tensor, denominator: str = "all"
) -> torch.Tensor:
    """Eq. 6: γ_i = exp cos(t_i, t+) / Σ_j exp cos(t_i, t_j)."""
    z = text_cos
    if denominator == "others":
        z = z.masked_fill(video_ids[:, None] == video_ids[None, :], float("-inf"))
    return torch.softmax(z, dim=1).gather(1, pseudo_positive.view(-1, 1)).squeeze(1)


def batch_loss(
    fg: torch.Tensor,
    bg: torch.Tensor,
    text_cos: torch.Tensor,
    pseudo_positive: torch.Tensor,
    video_ids: torch.Tensor,
    local: slice,
    tau: float,
    margin: float,
    denominator: str = "all",
) -> torch.Tensor:
    """Eq. 7: log[1 + Σ_i exp(τ γ_i (cos(v_b^i, v_f^+) - cos(v_f^i, v_f^+) + m))] over the global batch."""
    gamma = batch_gamma(text_cos, pseudo_positive, video_ids, denominator)
    fg_pos = fg[pseudo_positive]
    s_p = F.cosine_similarity(fg, fg_pos, dim=-1, eps=1e-8)
    s_n = F.cosine_similarity(bg, fg_pos, dim=-1, eps=1e-8)
    total = log1p_sum_exp(tau * gamma * (s_n - s_p + margin), dim=0)
    return _share(total, local, fg.shape[0])


# --------------------------------------------------------------------------------------------
# Variant and reference (not in the paper; see docs/method.md)
# --------------------------------------------------------------------------------------------
def cross_video_loss(
    phi_fg: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, n_global: int, tau: float, margin: float
) -> torch.Tensor:
    """Foreground of video i scored against other videos' queries: log[1 + Σ_j exp(τ(φ(v_f^i,t^j) - φ(v_f^i,t^i) + m))].

    phi_fg (b, N) for the local videos' foregrounds; negative (b, N) bool (same-video queries masked).
    """
    s_p = phi_fg.gather(1, positive.view(-1, 1))
    per_video = log1p_sum_exp(tau * (phi_fg - s_p + margin), negative, dim=1)
    return per_video.sum() / n_global


def supervised_loss(logits: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, n_global: int) -> torch.Tensor:
    """Cross-entropy of the snippet/candidate logits against the annotated target distribution (b, T)."""
    logp = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    per_video = -(target * logp.masked_fill(~mask, 0.0)).sum(-1)
    return per_video.sum() / n_global

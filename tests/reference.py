"""Slow references written loop by loop from the paper's equations (float64, plain Python math).

Nothing here is vectorised or shared with wsra_dist, so a test comparing the two can fail.
"""

from __future__ import annotations

import math

import torch


def phi(scorer, v: torch.Tensor, t: torch.Tensor) -> float:
    """φ(v, t) = Sigmoid(FC(Cat(v, t))): concatenate one pair and run the MLP's layers explicitly."""
    nv = v / max(float(v.norm()), 1e-6) if scorer.cfg.input_norm == "l2" else v
    nt = t / max(float(t.norm()), 1e-6) if scorer.cfg.input_norm == "l2" else t
    x = torch.cat([nv, nt])
    w = torch.cat([scorer.proj_v.weight, scorer.proj_t.weight], dim=1)
    h = w @ x + scorer.proj_v.bias
    for layer in scorer.tail:
        h = layer(h)
    return float(torch.sigmoid(h[0]))


def log1p_sum_exp(zs: list[float]) -> float:
    return math.log(1.0 + sum(math.exp(z) for z in zs))


def attention(scores: list[float]) -> list[float]:
    """Eq. 2 over the valid snippets."""
    e = [math.exp(s) for s in scores]
    return [x / sum(e) for x in e]


def fg_bg(v: torch.Tensor, alpha: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1: v (T, D) valid rows only."""
    T = v.shape[0]
    fg = sum(alpha[t] * v[t] for t in range(T))
    bg = sum((1 - alpha[t]) * v[t] for t in range(T)) / max(T - 1, 1)
    return fg, bg


def sampler(sim: list[list[float]], vids: list[int], k_top: int, k_last: int, self_in_top: bool = False):
    """Section 3.2.1 for each query i: rank other-video queries by similarity (ties: batch order)."""
    n = len(vids)
    out = []
    for i in range(n):
        cands = [j for j in range(n) if vids[j] != vids[i]]
        cands.sort(key=lambda j: (-sim[i][j], j))
        kt = max(k_top - 1, 0) if self_in_top else k_top
        pseudo = cands[:kt]
        easy = cands[len(cands) - k_last:] if k_last else []
        hard = [j for j in cands if j not in pseudo and j not in easy]
        out.append({"hard": set(hard), "pseudo": set(pseudo), "easy": set(easy), "first": cands[0]})
    return out


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / max(float(a.norm()) * float(b.norm()), 1e-8)


def wsra_terms(scorer, videos, texts, vids, cfg) -> dict[str, float]:
    """All terms of Eq. 8 for a batch: videos is a list of (T_i, D) tensors (valid rows), texts (N, Dt)."""
    n = len(videos)
    sims = [[cos(texts[i], texts[j]) for j in range(n)] for i in range(n)]
    samp = sampler(sims, vids, cfg.k_top, cfg.k_last, cfg.self_in_top_k)
    fgs, bgs, s_p, s_n = [], [], [], []
    for i in range(n):
        sc = [phi(scorer, videos[i][t], texts[i]) for t in range(videos[i].shape[0])]
        a = attention(sc)
        fg, bg = fg_bg(videos[i], a)
        fgs.append(fg)
        bgs.append(bg)
        s_p.append(phi(scorer, fg, texts[i]))
        s_n.append(phi(scorer, bg, texts[i]))
    out = {}
    # Eq. 3
    out["video"] = log1p_sum_exp([cfg.tau * (s_n[i] - s_p[i] + cfg.margin) for i in range(n)])
    # Eq. 4-5
    per_video = []
    for j in range(n):
        T = videos[j].shape[0]
        phis = [[phi(scorer, videos[j][t], texts[i]) for i in range(n)] for t in range(T)]
        beta = []
        for t in range(T):
            den = sum(math.exp(phis[t][i]) for i in range(n))
            scale = n if getattr(cfg, "beta_normalize", False) else 1
            beta.append([scale * math.exp(phis[t][i]) / den for i in range(n)])
        negs = sorted(samp[j]["hard"])
        if cfg.snippet_negatives == "in_log":
            zs = [cfg.tau * (beta[t][j] * phis[t][q] - beta[t][q] * phis[t][j] + cfg.margin) for q in negs for t in range(T)]
            per_video.append(log1p_sum_exp(zs))
        else:
            vals = [
                log1p_sum_exp([cfg.tau * (beta[t][j] * phis[t][q] - beta[t][q] * phis[t][j] + cfg.margin) for t in range(T)])
                for q in negs
            ]
            per_video.append(sum(vals) / (len(vals) if cfg.snippet_negatives == "mean" else 1))
    out["snippet"] = sum(per_video) / (n if cfg.snippet_videos == "mean" else 1)
    # Eq. 6-7
    zs = []
    for i in range(n):
        p = samp[i]["first"]
        js = range(n) if cfg.gamma_denominator == "all" else [j for j in range(n) if vids[j] != vids[i]]
        gamma = math.exp(sims[i][p]) / sum(math.exp(sims[i][j]) for j in js)
        zs.append(cfg.tau * gamma * (cos(bgs[i], fgs[p]) - cos(fgs[i], fgs[p]) + cfg.margin))
    out["batch"] = log1p_sum_exp(zs)
    # variant: cross-video foreground term
    per = []
    for i in range(n):
        negs = [j for j in range(n) if vids[j] != vids[i]] if cfg.cross_negatives == "all" else sorted(samp[i]["hard"])
        sp = phi(scorer, fgs[i], texts[i])
        per.append(log1p_sum_exp([cfg.cross_tau * (phi(scorer, fgs[i], texts[j]) - sp + cfg.cross_margin) for j in negs]))
    out["cross"] = sum(per) / n
    out["_samp"] = samp
    return out

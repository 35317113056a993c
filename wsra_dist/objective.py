"""One training objective evaluation: model outputs -> gathered global batch -> loss terms (Eq. 8).

The gather is injected (`Gatherer`), so this module has no distributed code of its own and the
same function serves 1 or N processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import losses as L
from .data.batch import Batch
from .distributed import Gatherer
from .model import WSRA


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # local share of Eq. 8 (sum over processes = one-process loss)
    terms: dict[str, torch.Tensor]  # local shares of each term, unweighted
    negatives: L.Negatives | None
    gatherer: Gatherer


def wsra_objective(model: WSRA | torch.nn.Module, batch: Batch, cfg: L.LossConfig, gatherer: Gatherer | None = None,
                   check_sampler: bool = True) -> ObjectiveOutput:
    """Eq. 8 (and the variant terms) for one batch.  `check_sampler=False`: the caller has already made sure every
    query keeps a hard negative (the trainer decides it on the host), so no tensor value is read here."""
    g = gatherer or Gatherer(batch.video.shape[0], batch.video.device)
    text_g = g.const(batch.text)
    out = model(batch.video, batch.mask, batch.text, text_g, all_pairs=bool(cfg.w_snippet), fg_pairs=bool(cfg.w_cross))
    vid_g = g.const(batch.video_id)
    n = g.n_global
    local = g.local
    positive = torch.arange(local.start, local.stop, device=batch.video.device)
    terms: dict[str, torch.Tensor] = {}

    need_sampler = cfg.w_snippet or cfg.w_batch or (cfg.w_cross and cfg.cross_negatives == "hard")
    negatives = None
    text_cos = None
    if need_sampler:
        tn = F.normalize(text_g, dim=-1)
        text_cos = tn @ tn.T
        negatives = L.sample_negatives(text_cos, vid_g, cfg.k_top, cfg.k_last, cfg.self_in_top_k, check=check_sampler)

    if cfg.w_video:
        s_pos, s_neg = g.with_grad(out.s_pos), g.with_grad(out.s_neg)
        terms["video"] = L.video_loss(s_pos, s_neg, local, cfg.tau, cfg.margin)
    if cfg.w_snippet:
        terms["snippet"] = L.snippet_loss(
            out.phi_all, batch.mask, positive, negatives.hard[local], n, cfg.tau, cfg.margin,
            cfg.snippet_negatives, cfg.snippet_videos, cfg.beta_normalize,
        )
    if cfg.w_batch:
        fg_g, bg_g = g.with_grad(out.fg), g.with_grad(out.bg)
        terms["batch"] = L.batch_loss(
            fg_g, bg_g, text_cos, negatives.pseudo_positive, vid_g, local, cfg.tau, cfg.margin, cfg.gamma_denominator
        )
    if cfg.w_cross:
        if cfg.cross_negatives == "hard":
            neg = negatives.hard[local]
        else:
            neg = vid_g[local][:, None] != vid_g[None, :]
        terms["cross"] = L.cross_video_loss(out.phi_fg, positive, neg, n, cfg.cross_tau, cfg.cross_margin)
    if cfg.w_supervised:
        terms["supervised"] = L.supervised_loss(out.logits, batch.mask, batch.target, n)

    weights = {"video": cfg.w_video, "snippet": cfg.w_snippet, "batch": cfg.w_batch,
               "cross": cfg.w_cross, "supervised": cfg.w_supervised}
    if not terms:
        raise ValueError("every loss weight is 0: set at least one of loss.w_video/w_snippet/w_batch/w_cross/w_supervised")
    total = sum(weights[k] * v for k, v in terms.items())
    return ObjectiveOutput(loss=total, terms=terms, negatives=negatives, gatherer=g)

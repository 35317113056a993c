"""Checkpoint + shards -> ranked moments per query (prediction dicts, the JSONL format)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data.features_manifest import describe_extractor, same_extractor
from ..data.loader import ShardSource, iter_eval_batches
from ..geometry import DIDEMO_CANDIDATES, benchmark_windows, window_snippet_range
from ..model import WSRA, DidemoLayout


def layout_of(manifest: dict) -> dict | None:
    """The model-input layout a shard manifest implies (recorded in the checkpoint's info)."""
    if manifest.get("layout") == "didemo_chunks":
        d = manifest["dims"]
        return DidemoLayout(tuple(d["modalities"]), bool(d.get("tef", False))).to_dict()
    return None


def model_from_info(info: dict, manifest: dict | None = None) -> WSRA:
    """The model an info dict describes; `manifest` supplies the input layout for checkpoints that lack it."""
    layout = info.get("layout") or (layout_of(manifest) if manifest else None)
    return WSRA.from_info({**info, "layout": layout})


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[WSRA, dict]:
    """A trained run folder (model.safetensors + wsra_model.json) -> model in eval mode and its info.  With
    model.scale_calibration on, the training statistics are attached (read from, or first written beside the
    weights: evaluation/calibration.py)."""
    from .calibration import attach

    model = WSRA.from_pretrained(run_dir, device)
    attach(model, run_dir, device)
    return model, model.info


def check_compatible(info: dict, manifest: dict, where: str) -> None:
    d, t = manifest["dims"], manifest["text"]
    if d["video"] != info["dims"]["video"] or d["text"] != info["dims"]["text"]:
        raise ValueError(f"{where}: shards have video/text dims {d['video']}/{d['text']} but the checkpoint was "
                         f"trained on {info['dims']['video']}/{info['dims']['text']}")
    ct = info.get("text", {})
    if ct and (ct.get("model") != t.get("model") or ct.get("pooling") != t.get("pooling")):
        raise ValueError(f"{where}: shards' text features come from {t.get('model')}/{t.get('pooling')} but the "
                         f"checkpoint was trained on {ct.get('model')}/{ct.get('pooling')}")
    ce, se = info.get("extractor"), manifest.get("extractor")
    if ce and se and not same_extractor(ce, se):  # same dims, other video model: the scores would be noise
        raise ValueError(f"{where}: shards' video features come from {describe_extractor(se)} but the checkpoint was "
                         f"trained on {describe_extractor(ce)}")


@torch.inference_mode()
def ranking_logits(model: WSRA, batch, protocol: str, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, np.ndarray | None]]:
    """Per query of the batch: (the logits its candidates are ranked by before any scale calibration, float64 (W,)
    on the CPU (DiDeMo: WSRA.candidate_logits, -inf past the video's end), the window size of each candidate
    (scale_calibration.window_groups), the windows in seconds (W, 2) or None for DiDeMo's 21 candidates).
    With model.scale_calibration "contrast" (snippet benchmarks) the values are scale_calibration.inside_outside
    of the snippets' logits instead of the window logits."""
    from ..scale_calibration import DIDEMO_GROUPS, WITHIN_VIDEO, inside_outside, window_groups

    video, mask, text = batch.video.to(device), batch.mask.to(device), batch.text.to(device)
    if protocol == "didemo":
        logits = model.candidate_logits(video, text).double().masked_fill(~mask, float("-inf")).cpu()
        groups = torch.tensor(DIDEMO_GROUPS, dtype=torch.long)
        return [(lg, groups, None) for lg in logits]
    mode = getattr(model, "scale_calibration", "none")
    out = []
    for i, m in enumerate(batch.meta):
        T = int(mask[i].sum())
        dur = float(m["duration"])
        wins = benchmark_windows(protocol, dur)  # the protocol's windows (Charades-STA's, ActivityNet's)
        ranges = torch.tensor([window_snippet_range(a, b, dur, T) for a, b in wins], device=device)
        groups = window_groups(protocol, dur)
        if mode in WITHIN_VIDEO:  # φ of each snippet, then inside vs outside each window / each window's mass
            sl = model.scorer.logits_from_hidden(model.scorer.project_video(video[i, :T]) + model.scorer.project_text(text[i]))
            if mode == "contrast":
                lg = inside_outside(sl, ranges, getattr(model, "contrast_weight", 1.0)).cpu()
            else:
                lg, wins, groups = with_span(sl, ranges, wins, groups, dur, getattr(model, "span_threshold", -0.3),
                                              getattr(model, "span_band", 0.0))
        else:
            pv = model.scorer.project_windows(video[i, :T], ranges)  # windows pooled from projected snippets
            lg = model.scorer.logits_from_hidden(pv + model.scorer.project_text(text[i])).double().cpu()
        out.append((lg, groups, wins))
    return out


def with_span(snippet_logits: torch.Tensor, ranges: torch.Tensor, wins: np.ndarray, groups: torch.Tensor,
              duration: float, threshold: float, band: float = 0.0) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """scale_calibration span for one query: (values, windows, groups), the best span first (its group: -1), the
    windows after it less any on the span's very snippets (scale_calibration.span_values; `band`: model.span_band)."""
    from ..scale_calibration import span_values

    values, span = span_values(snippet_logits, ranges, threshold, band)
    values = values.cpu()
    keep = torch.isfinite(values)
    T = snippet_logits.shape[0]
    sec = np.array([[span[0].item() * duration / T, span[1].item() * duration / T]])
    allw = np.concatenate([sec, np.asarray(wins, dtype=np.float64)])
    allg = torch.cat([groups.new_full((1,), -1), groups])
    return values[keep], allw[keep.numpy()], allg[keep]


@torch.inference_mode()
def rank_batch(model: WSRA, batch, protocol: str, device: torch.device) -> list[dict]:
    from ..scale_calibration import calibrate

    # Order by logits and report sigmoid in float64: a float32 sigmoid saturates to 1 above a logit of ~17, and
    # the tied candidates would be ordered by their position instead of their score.  With
    # model.scale_calibration (attached by evaluation/calibration.py) the logits are first calibrated per window size.
    mode, stats = getattr(model, "scale_calibration", "none"), getattr(model, "scale_stats", None)
    out = []
    for m, (lg, groups, wins) in zip(batch.meta, ranking_logits(model, batch, protocol, device)):
        lg = calibrate(mode, lg, groups, stats)
        s = torch.sigmoid(lg).numpy()
        lg = lg.numpy()
        order = np.argsort(-lg, kind="stable")
        if protocol == "didemo":
            s = np.where(np.isfinite(lg), s, -np.inf)
            out.append({"annotation_id": m["query_id"], "moments": [list(DIDEMO_CANDIDATES[i]) for i in order],
                        "scores": [float(s[i]) for i in order]})
        else:
            out.append({"query_id": m["query_id"], "video": m["video"],
                        "moments": [[round(float(wins[j, 0]), 4), round(float(wins[j, 1]), 4)] for j in order],
                        "scores": [float(s[j]) for j in order]})
    return out


def predict(model: WSRA, source: ShardSource, protocol: str, batch_size: int = 64, world: int = 1, rank: int = 0,
            device: torch.device | str = "cpu", verify: bool = True) -> tuple[list[dict], list[dict]]:
    """(predictions, ground-truth records from the shards' meta) for this process's shards."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    preds, truth = [], []
    m = (getattr(model, "info", None) or {}).get("model", {})
    if not hasattr(model, "scale_calibration") and m.get("scale_calibration") in ("contrast", "span"):
        # a model not loaded through load_run (training's validation): contrast and span need no statistics
        model.scale_calibration, model.scale_stats = m["scale_calibration"], None
        model.contrast_weight = float(m.get("contrast_weight", 16.0))
        model.span_threshold = float(m.get("span_threshold", -0.3))
        model.span_band = float(m.get("span_band", 0.0))
    if getattr(model, "didemo", None) is None and source.layout == "didemo_chunks":
        model.didemo = DidemoLayout.from_dict(layout_of(source.manifest))
    for batch in iter_eval_batches(source, batch_size, world, rank, verify):
        preds += rank_batch(model, batch, protocol, device)
        truth += [{"query_id": m["query_id"], "video": m["video"], "times": m["times"], "duration": m["duration"],
                   "query": m.get("query", "")} for m in batch.meta]
    model.train(was_training)
    return preds, truth

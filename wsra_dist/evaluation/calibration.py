"""Training statistics of `model.scale_calibration` (wsra_dist/scale_calibration.py): the trained model scores
every training query against every candidate window of its own training video (no timestamps are read), the
per-window-size mean and sd of those ranking logits are written beside the weights as JSON
(`scale_calibration.json`, keyed by the weights' SHA-256 and the ranking settings) the first time a checkpoint
is loaded with the option on, and read back afterwards.  Training is unchanged: the statistics are a function
of the final weights and the training shards named in the run's recipe.yaml."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..data.records import DataError
from ..scale_calibration import (NEEDS_STATS, accumulate, check_mode, empty_stats, finish, n_groups,
                                 stats_from_json, stats_to_json)

CALIBRATION_FILE = "scale_calibration.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ranking_key(model) -> dict:
    """What the statistics depend on besides the weights: the logits they are taken of."""
    return {"benchmark": model.info.get("benchmark"), "chunk_consistency": float(getattr(model, "chunk_consistency", 0.0))}


def fit_stats(model, source, protocol: str, batch_size: int = 64, device: str | torch.device = "cpu",
              verify: bool = True) -> dict:
    """Scale statistics (JSON-ready dict) of `model` over every query of `source` (the training shards) against
    every candidate of its own video."""
    from ..data.loader import iter_eval_batches
    from .predict import ranking_logits

    device = torch.device(device)
    was_training = model.training
    model.eval()
    acc, queries = empty_stats(n_groups(protocol)), 0
    try:
        for batch in iter_eval_batches(source, batch_size, 1, 0, verify):
            for lg, groups, _ in ranking_logits(model, batch, protocol, device):
                acc = accumulate(acc, lg, groups)
                queries += 1
    finally:
        model.train(was_training)
    if not queries:
        raise DataError("scale calibration: the training shards hold no queries")
    mu, sd = finish(acc)
    return stats_to_json(mu, sd, acc[:, 0], queries=queries, protocol=protocol)


def train_shards_of(run_dir: str | Path) -> tuple[str, str]:
    """(data.train_shards, data.train_manifest) of a run folder's recipe.yaml (paths as training read them)."""
    import yaml

    recipe = Path(run_dir) / "recipe.yaml"
    try:
        data = (yaml.safe_load(recipe.read_text()) or {}).get("data", {})
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise DataError(f"scale calibration needs the run's training shards: no readable {recipe} "
                        f"({type(e).__name__})") from None
    src = str(data.get("train_shards") or "")
    if not src:
        raise DataError(f"scale calibration needs the run's training shards: {recipe} names no data.train_shards")
    from ..run_folder import recipe_path

    return recipe_path(run_dir, src), recipe_path(run_dir, str(data.get("train_manifest") or ""))


def ranking_settings(model) -> dict:
    """How a model ranks beyond φ, for the files that record it: {"scale_calibration": mode} plus λ (contrast) or
    θ (span)."""
    mode = getattr(model, "scale_calibration", "none")
    d: dict = {"scale_calibration": mode}
    if mode == "contrast":
        d["contrast_weight"] = float(model.contrast_weight)
    if mode == "span":
        d["span_threshold"] = float(model.span_threshold)
        d["span_band"] = float(getattr(model, "span_band", 0.0))
    return d


def attach(model, run_dir: str | Path, device: str | torch.device = "cpu", mode: str | None = None,
           train_shards: str | None = None, batch_size: int = 64, contrast_weight: float | None = None,
           span_threshold: float | None = None, span_band: float | None = None) -> None:
    """Set `model.scale_calibration` (`mode`, else the checkpoint's model.scale_calibration, else none) and, when
    on, `model.scale_stats`: read from RUN/scale_calibration.json when it matches the weights and the ranking,
    else computed on the run's training shards (or `train_shards`) and written there (atomically)."""
    m = model.info.get("model", {})
    mode = check_mode(mode if mode is not None else m.get("scale_calibration", "none"))
    model.scale_calibration, model.scale_stats = mode, None
    model.contrast_weight = float(contrast_weight if contrast_weight is not None else m.get("contrast_weight", 16.0))
    model.span_threshold = float(span_threshold if span_threshold is not None else m.get("span_threshold", -0.3))
    model.span_band = float(span_band if span_band is not None else m.get("span_band", 0.0))
    if mode in ("contrast", "span") and (model.info.get("benchmark") == "didemo" or getattr(model, "didemo", None) is not None):
        raise DataError(f"model.scale_calibration {mode} ranks windows over snippets (Charades-STA, ActivityNet); "
                        "DiDeMo's candidates have chunk_consistency")
    if mode not in NEEDS_STATS:
        return
    run_dir = Path(run_dir)
    weights = run_dir / "model.safetensors"
    key = {"weights_sha256": _sha256(weights) if weights.is_file() else None, **ranking_key(model)}
    path = run_dir / CALIBRATION_FILE
    if path.is_file() and train_shards is None:
        try:
            d = json.loads(path.read_text())
            if all(d.get(k) == v for k, v in key.items()):
                model.scale_stats = stats_from_json(d)
                return
        except ValueError:
            pass  # unreadable or stale: recomputed below
    src, manifest = (train_shards, "") if train_shards else train_shards_of(run_dir)
    from ..data.loader import ShardSource

    source = ShardSource.open(src, manifest)
    protocol = source.manifest.get("benchmark")
    if protocol != model.info.get("benchmark") and model.info.get("benchmark") is not None:
        raise DataError(f"scale calibration: {src} holds {protocol!r} shards, the checkpoint is {model.info.get('benchmark')!r}")
    d = {**fit_stats(model, source, protocol, batch_size, device), **key, "train_shards": src}
    model.scale_stats = stats_from_json(d)
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(d, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only run folder: the statistics are still used, recomputed next time

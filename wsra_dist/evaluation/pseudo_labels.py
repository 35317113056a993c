"""Pseudo-labels for one round of self-training (issue #26; docs/method.md "Self-training").

A trained run ranks every query of the TRAINING split as `evaluate` would (its model.scale_calibration: with
`span`, each query's best span); the top-1 moment becomes the query's times in a copy of the training shards.
No timestamp is read: the copy's times are the model's, and the source shards' annotated times are dropped,
not kept beside them.  A second run trained on the copy with `loss.w_supervised` (cross-entropy on those
times) beside the weak losses is the student (`recipes/activitynet_self.yaml`).

Each query also gets a `weight`: 1 for the `keep` fraction with the highest top-1 scores, else 0; the loader
scales the query's supervised target by it, so a student learns the times of the teacher's confident answers only
and the rest of the queries by the weak losses (docs/method.md).

Snippet benchmarks only (Charades-STA, ActivityNet): DiDeMo's supervised target is a candidate index, which
this does not write.  The copy is written through the shard writer's staging folder and swapped in when
complete; its manifest names the checkpoint (path and weights' SHA-256) and the ranking used.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.batch import Batch
from ..data.loader import ShardSource
from ..data.records import DataError
from ..data.shards import ShardWriter, Staging, encode_sample, iter_shard, sha256_file
from .calibration import ranking_settings
from .predict import check_compatible, load_run, rank_batch

# manifest keys the writer sets itself
_WRITER_KEYS = ("format", "compression", "shards", "num_samples", "num_queries", "total_bytes")


def _video_batch(sample: dict) -> Batch:
    """One video sample's queries as an evaluation batch (the video repeated per query; meta as the loader's)."""
    meta = sample["meta.json"]
    video_meta = {k: v for k, v in meta.items() if k != "queries"}
    queries = meta["queries"]
    v = torch.from_numpy(np.ascontiguousarray(sample["video.npy"], dtype=np.float32))
    Q, T = len(queries), v.shape[0]
    metas = [{**video_meta, **q, "query": q.get("sentence", "")} for q in queries]
    return Batch(v.unsqueeze(0).expand(Q, -1, -1), torch.ones(Q, T, dtype=torch.bool),
                 torch.from_numpy(np.asarray(sample["text.npy"], dtype=np.float32)),
                 torch.full((Q,), int(meta.get("video_hash", 0)), dtype=torch.long), torch.zeros(Q, T), metas)


def _relabel(meta: dict, ranked: list[dict], floor: float = -np.inf) -> dict:
    """The video's meta with each query's times replaced by its top-1 moment (marked `pseudo`) and a `weight`: 1
    when its top-1 score reaches `floor` (the student's L_supervised uses the times), else 0 (the query trains by
    the weak losses alone).  The score itself is not written: its last bits differ between thread counts and
    processes, and the labels must be the same bytes wherever the same teacher writes them."""
    out = {**meta, "queries": []}
    for q, r in zip(meta["queries"], ranked):
        s, e = (float(x) for x in r["moments"][0])
        out["queries"].append({**q, "start": s, "end": e, "times": [[s, e]], "pseudo": True,
                               "weight": 1.0 if float(r["scores"][0]) >= floor else 0.0})
    return out


def confidence_floor(confidences: list[float], keep: float) -> float:
    """The score a query's top-1 must reach to be among the `keep` most confident fraction (at least one query;
    ties at the floor are all kept, so a little more than `keep` may be)."""
    if not confidences or keep >= 1.0:
        return -np.inf
    c = np.sort(np.asarray(confidences, dtype=np.float64))[::-1]
    return float(c[max(int(np.ceil(keep * len(c))), 1) - 1])


def _check_inputs(checkpoint: Path, src: ShardSource, shards: str, out: str | Path, span_threshold: float | None,
                  span_band: float | None, keep: float) -> str:
    """Every refusal that needs no model, before anything loads or is written; returns the benchmark."""
    from .runner import check_ranking

    if not (checkpoint / "model.safetensors").is_file():
        raise DataError(f"--checkpoint {checkpoint}: not a trained run folder (no model.safetensors)")
    protocol = src.manifest.get("benchmark")
    if protocol not in ("charades", "activitynet"):
        raise DataError(f"--shards {shards}: {protocol!r} shards; pseudo-labels are written for snippet benchmarks "
                        "(Charades-STA, ActivityNet)")
    check_ranking(protocol, None, None, None, span_threshold, span_band)  # evaluate's checks, before loading
    if not (isinstance(keep, (int, float)) and math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise DataError(f"--keep must be a fraction in (0, 1], got {keep}")
    if src.manifest.get("pseudo_labels"):
        raise DataError(f"--shards {shards}: already pseudo-labelled (by {src.manifest['pseudo_labels'].get('checkpoint')}); "
                        "give the original training shards")
    if Path(out).resolve() == Path(shards).resolve():
        raise DataError(f"--out {out} is the --shards folder: the training shards (and their annotated times) would "
                        "be replaced; give another folder")
    return protocol


def _load_teacher(checkpoint: Path, src: ShardSource, shards: str, protocol: str, dev: torch.device,
                  span_threshold: float | None, span_band: float | None):
    """The checkpoint's model with the span ranking's θ / band replaced where given; refused when it does not fit
    the shards."""
    model, info = load_run(checkpoint, dev)
    if span_threshold is not None or span_band is not None:
        if model.scale_calibration != "span":
            raise DataError(f"--span-threshold / --span-band are parameters of the span ranking, but {checkpoint} "
                            f"ranks by {model.scale_calibration}")
        if span_threshold is not None:
            model.span_threshold = float(span_threshold)
        if span_band is not None:
            model.span_band = float(span_band)
    if info.get("benchmark") and info["benchmark"] != protocol:
        raise DataError(f"--checkpoint {checkpoint} was trained on {info['benchmark']!r} shards, --shards {shards} "
                        f"holds {protocol!r}")
    try:
        check_compatible(info, src.manifest, shards)
    except ValueError as e:
        raise DataError(str(e)) from None
    return model


def _samples(src: ShardSource):
    for url, sha in zip(src.urls, src.shas):
        yield from iter_shard(url, src.manifest, sha, src.read_timeout_s)


def pseudo_label(checkpoint: str | Path, shards: str, out: str | Path, device: str | None = None,
                 progress: Callable[[int, int], None] | None = None, span_threshold: float | None = None,
                 span_band: float | None = None, manifest: str = "", keep: float = 1.0) -> dict:
    """Write OUT: `shards` with every query's times replaced by `checkpoint`'s top-1 moment; returns the manifest.
    `keep` (0 < keep <= 1): the fraction of queries, most confident top-1 score first, whose times the student's
    L_supervised uses (weight 1; the rest weight 0).  `progress(videos_done, videos_total)` is called after each
    video of the ranking pass.  `span_threshold` / `span_band` replace the checkpoint's model.span_threshold /
    model.span_band (a checkpoint ranked by span; None keeps its own).  `manifest`: the shards' manifest when
    `shards` is a URL pattern (as data.train_manifest)."""
    checkpoint = Path(checkpoint)
    src = ShardSource.open(shards, manifest)
    protocol = _check_inputs(checkpoint, src, shards, out, span_threshold, span_band, keep)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _load_teacher(checkpoint, src, shards, protocol, dev, span_threshold, span_band)
    src.check_files("--shards")
    staging = Staging(out)
    stage = staging.create(int(src.manifest.get("total_bytes") or 0))
    writer = ShardWriter(stage, max(int(s["num_samples"]) for s in src.manifest["shards"]),
                         compress=src.manifest.get("compression") == "gzip")
    total = int(src.manifest.get("num_samples") or 0)
    try:
        def write(sample: dict, floor: float) -> None:
            meta = sample["meta.json"]
            writer.write(sample["__key__"], encode_sample(sample["video.npy"], sample["text.npy"],
                                                          _relabel(meta, ranked[sample["__key__"]], floor)),
                         len(meta["queries"]))

        # keep < 1: the floor needs every score, so the ranking pass comes first and a second pass writes the copy
        # (keep 1, the recipes' default: one pass, every query weight 1)
        ranked: dict[str, list[dict]] = {}
        for sample in _samples(src):
            queries = sample["meta.json"]["queries"]
            ranked[sample["__key__"]] = rank_batch(model, _video_batch(sample), protocol, dev) if queries else []
            if keep >= 1.0:
                write(sample, -np.inf)
            if progress is not None:
                progress(len(ranked), total)
        floor = confidence_floor([float(r["scores"][0]) for rs in ranked.values() for r in rs], keep)
        if keep < 1.0:
            for sample in _samples(src):
                write(sample, floor)
        manifest = {k: v for k, v in src.manifest.items() if k not in _WRITER_KEYS}
        manifest["pseudo_labels"] = {"checkpoint": str(checkpoint.resolve()),
                                     "weights_sha256": sha256_file(checkpoint / "model.safetensors"),
                                     "source_shards": str(Path(shards).resolve()), "ranking": ranking_settings(model),
                                     "keep": float(keep), "confidence_floor": floor if np.isfinite(floor) else None,
                                     "rule": "each query's times are the checkpoint's top-1 moment; the source "
                                             "shards' annotated times are not kept; weight 1 (times used by "
                                             "L_supervised) when the top-1 score reaches confidence_floor"}
        manifest = writer.finish(manifest)
    except BaseException:
        writer.abort()
        staging.discard()
        raise
    staging.publish()
    return manifest

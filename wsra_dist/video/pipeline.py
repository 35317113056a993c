"""One video: decode -> select frames -> extract (batched) -> pool into bins -> (T, D) or (6, D).

The time rules are timing.py's; this file only wires them to the decoder and the extractor.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .decode import Video, VideoError
from .timing import BinPooler, Grid, NearestSelector, sample_times

LAYOUTS = ("charades", "didemo", "activitynet")


@dataclass(frozen=True)
class Spec:
    layout: str
    fps: float
    frames_per_snippet: int = 0  # 0: every decoded frame
    batch_size: int = 32

    def __post_init__(self) -> None:
        from ..data.records import DataError

        if self.layout not in LAYOUTS:
            raise DataError(f"--layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not (self.fps > 0 and np.isfinite(self.fps)):
            raise DataError(f"--fps must be a positive number of snippets per second, got {self.fps}")
        if self.frames_per_snippet < 0:
            raise DataError(f"--frames-per-snippet must be >= 0 (0: every frame), got {self.frames_per_snippet}")
        if self.batch_size < 1:
            raise DataError(f"--batch-size must be >= 1, got {self.batch_size}")


def extract_video(path: str | Path, extractor, spec: Spec, prefetch: int | None = None,
                  progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, dict]:
    """(features, record) of one video; raises decode.VideoError with the reason when it cannot be used.

    `prefetch`: frames decoded ahead in a helper thread (None: the extractor's choice; 0: no thread).
    `progress(n)` is told about decoded frames once per batch.  The record holds what the features
    manifest lists per video: T (bins), duration and its source, frames decoded and used, empty bins."""
    if prefetch is None:
        prefetch = int(getattr(extractor, "prefetch", 0))
    with Video(path) as v:
        info = v.info
        grid = Grid.for_layout(spec.layout, info.duration, spec.fps)
        end = grid.count * grid.width  # frames after the first one past the last bin cannot change anything
        pooler = BinPooler(grid, extractor.dim)
        selector = None
        if spec.frames_per_snippet:
            targets = sample_times(info.duration, spec.fps, spec.frames_per_snippet)
            selector = NearestSelector(targets[targets < end])
        prep: list = []
        times: list[float] = []
        stands: list[list[float]] = []
        decoded, unreported, last = 0, 0, None

        def flush() -> None:
            nonlocal unreported
            if prep:
                pooler.add(extractor.embed(prep), np.asarray(times), stands if selector else None)
                prep.clear(), times.clear(), stands.clear()
            if progress and unreported:
                progress(unreported)
            unreported = 0

        def take(t: float, frame, sf: list[float] | None = None) -> None:
            prep.append(extractor.prepare(frame))
            times.append(t)
            if sf is not None:
                stands.append(sf)
            if len(prep) >= spec.batch_size:
                flush()

        with contextlib.closing(v.frames(prefetch)) as frames:
            for t, frame in frames:
                decoded += 1
                unreported += 1
                last = t
                if selector is None:
                    take(t, frame)
                else:
                    for tt, fr, sf in selector.push(t, frame):
                        take(tt, fr, sf)
                if t >= end:
                    break
        if selector is not None:
            for tt, fr, sf in selector.finish():
                take(tt, fr, sf)
        flush()
    if decoded == 0:
        raise VideoError("no frame could be decoded")
    x, empty = pooler.result()
    if not np.isfinite(x).all():
        raise VideoError("the extractor gave NaN or inf features for this video")
    record = {"T": int(grid.count), "duration": round(info.duration, 6), "duration_source": info.duration_source,
              "frames_decoded": decoded, "frames_used": pooler.frames, "empty_bins": empty,
              "last_frame_s": round(float(last), 6), "width": info.width, "height": info.height,
              "pix_fmt": info.pix_fmt, "codec": info.codec}
    gap = min(info.duration, end) - float(last)
    step = 2.0 / info.rate if info.rate else 0.0
    if gap > 1.0 + step:
        record["warning"] = (f"frames end at {last:.2f} s, {gap:.2f} s before the declared duration "
                             f"{info.duration:.2f} s ({info.duration_source}): the bins after it repeat the last frame")
    return x, record


def checkpoint_features(info: dict, video: str | Path, video_model: str | None = None, device: str | None = None,
                        batch_size: int = 32) -> tuple[np.ndarray, float]:
    """(features, duration in s) of a raw video, made with the extractor a checkpoint records (`ground --video`).

    Refused with one line: a checkpoint with no recorded extractor (trained on official features), a layout
    that is not the checkpoint's benchmark's, or an extractor here that differs from the recorded one
    (other weights sha256, pooling or dim)."""
    from ..data.features_manifest import describe_extractor, identity
    from ..data.records import DataError
    from .extract import PIXELS, extractor_record, load_extractor

    ex = info.get("extractor")
    if not isinstance(ex, dict) or not ex:
        raise DataError("--video: this checkpoint records no video extractor: it was trained on features that "
                        "`wsra-dist features` did not make (official precomputed features, or shards without a "
                        "features manifest); ground it with --features, or train on `wsra-dist features` output")
    parts = ex["concat"] if isinstance(ex.get("concat"), list) else [ex]
    bench = info.get("benchmark")
    feats, seconds = [], 0.0
    for e in parts:
        lay = e.get("layout")
        if lay not in LAYOUTS or (bench == "didemo") != (lay == "didemo"):
            raise DataError(f"--video: the checkpoint ({bench}) records features in the {lay!r} layout, which its "
                            "benchmark does not read")
        if e.get("kind") == PIXELS:
            model = PIXELS
        elif e.get("kind") == "hf-image":
            # the record names the model and its weights' sha256, not a path: the user says where it is here
            model = video_model or e.get("path")  # (`path`: records written before paths were dropped)
            if not model or not Path(model).is_dir():
                where = f"is not at {model}" if model else "is recorded by name and weights sha256 only"
                raise DataError(f"--video: the image model the checkpoint's features were extracted with "
                                f"({e.get('model')}, weights sha256 {str(e.get('weights_sha256'))[:12]}...) {where}; "
                                "give its local folder with --video-model")
        else:
            raise DataError(f"--video: the checkpoint records an extractor of unknown kind {e.get('kind')!r}")
        extractor = load_extractor(model, device, expect_sha256=e.get("weights_sha256"))
        k = int(e.get("frames_per_snippet") or 0)
        here = extractor_record(extractor, float(e.get("fps") or 0), k, lay)
        if identity(here) != identity(e):
            raise DataError(f"--video: the extractor here ({describe_extractor(here)}) differs from the one the "
                            f"checkpoint was trained with ({describe_extractor(e)})")
        try:
            x, rec = extract_video(video, extractor, Spec(lay, float(e["fps"]), k, batch_size))
        except VideoError as err:
            raise DataError(f"--video {video}: {err}") from None
        feats.append(x)
        seconds = float(rec["duration"])
    if len({f.shape[0] for f in feats}) > 1:
        raise DataError(f"--video: the checkpoint's feature sources give {[f.shape[0] for f in feats]} rows for this video")
    return np.concatenate(feats, axis=1), seconds

"""Frame -> feature vector: the model-free `pixels` extractor and local Hugging Face image models.

An extractor has `dim`, `record()` (what the features manifest stores), `prepare(frame)` (per decoded
frame, cheap, in the decoding order) and `embed(prepared_list) -> (B, dim) float32` (batched).

`pixels` (48-d).  The frame area-resized to 4 x 4 - output cell (i, j) is the mean over the region
[i H/4, (i+1) H/4) x [j W/4, (j+1) W/4) of the picture, each source pixel weighted by the part of it that
lies in the region (exact area averaging; `area_resize` is that definition, in float64) - in RGB in [0, 1],
flattened in (y, x, channel) order.  For 8-bit planar YUV (yuv420p & co., nearly every video) the planes
are averaged first and the 16 mean colours converted to RGB with the frame's matrix (BT.601 unless the
stream says BT.709 or BT.2020) and range (limited unless full/JPEG), then clipped to [0, 1]: the
conversion is affine, so this equals averaging the converted picture except where single pixels would
have been clipped, and it keeps `pixels` near decoding speed (0.83 of bare decoding, docs/benchmarks.md).
Chroma planes are averaged over the same fractions of their own size.  Other formats (RGB, 10-bit,
paletted, ...) are converted to rgb24 by libswscale first and area-resized exactly.

Hugging Face models (`--model PATH`, a local folder; nothing is downloaded): AutoImageProcessor +
AutoModel with local_files_only=True, frames as RGB arrays.  Full two-tower models (CLIP, SigLIP, ALIGN:
models with a `vision_model` and `get_image_features`) use their vision tower.  The pooled vector per
frame is the output's `pooler_output` if present, else `image_embeds`, else the mean of
`last_hidden_state` over tokens (the choice is made once on a blank frame and recorded as `pooling`).
Video models (VideoMAE) are not supported: they need clips, not frames.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import __version__
from ..data.records import DataError

PIXELS = "pixels"
PIXELS_GRID = 4  # 4 x 4 cells x RGB = 48 values
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")

# 8-bit planar YUV formats: (horizontal, vertical) chroma subsampling, full range implied by the name
_PLANAR_YUV = {"yuv420p": (2, 2, False), "yuvj420p": (2, 2, True), "yuv422p": (2, 1, False),
               "yuvj422p": (2, 1, True), "yuv444p": (1, 1, False), "yuvj444p": (1, 1, True),
               "yuv440p": (1, 2, False), "yuvj440p": (1, 2, True), "yuv411p": (4, 1, False)}
# (Kr, Kb) by AVColorSpace: 1 BT.709, 9/10 BT.2020; everything else (unspecified, BT.601 variants, FCC)
# as BT.601 - libswscale's own default, so `frame.to_ndarray(format="rgb24")` agrees with these features.
_MATRICES = {1: (0.2126, 0.0722), 9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}
_BT601 = (0.299, 0.114)


# ------------------------------------------------------------------------------------ the definition
@lru_cache(maxsize=64)
def area_weights(n: int, m: int) -> np.ndarray:
    """(m, n) weights of exact area resizing of n source samples to m: row i is the overlap of source
    sample r = [r, r+1) with [i n/m, (i+1) n/m), divided by n/m (each row sums to 1)."""
    w = np.zeros((m, n), dtype=np.float64)
    for i in range(m):
        a, b = i * n / m, (i + 1) * n / m
        for r in range(int(np.floor(a)), min(n, int(np.ceil(b)))):
            w[i, r] = min(b, r + 1) - max(a, r)
    w /= n / m
    w.setflags(write=False)
    return w


def area_resize(img: np.ndarray, out_h: int = PIXELS_GRID, out_w: int = PIXELS_GRID) -> np.ndarray:
    """Exact area resize of an (H, W) or (H, W, C) array to (out_h, out_w[, C]) in float64."""
    x = np.asarray(img, dtype=np.float64)
    wy, wx = area_weights(x.shape[0], out_h), area_weights(x.shape[1], out_w)
    if x.ndim == 2:
        return wy @ x @ wx.T
    return np.einsum("ih,hwc,jw->ijc", wy, x, wx)


def yuv_to_rgb(yuv: np.ndarray, colorspace: int = 2, full_range: bool = False) -> np.ndarray:
    """(..., 3) Y, Cb, Cr in 8-bit code values -> RGB in [0, 1] (clipped)."""
    kr, kb = _MATRICES.get(int(colorspace), _BT601)
    y, cb, cr = (np.asarray(yuv, dtype=np.float64)[..., i] for i in range(3))
    if full_range:
        y, cb, cr = y / 255.0, (cb - 128.0) / 255.0, (cr - 128.0) / 255.0
    else:
        y, cb, cr = (y - 16.0) / 219.0, (cb - 128.0) / 224.0, (cr - 128.0) / 224.0
    r = y + 2 * (1 - kr) * cr
    b = y + 2 * (1 - kb) * cb
    g = (y - kr * r - kb * b) / (1 - kr - kb)
    return np.clip(np.stack([r, g, b], -1), 0.0, 1.0)


# ------------------------------------------------------------------------------------ fast plane means
def _plane(p: Any) -> np.ndarray:
    """A decoded plane as an (h, w) uint8 view (no copy; rows padded to line_size are cut)."""
    return np.frombuffer(p, np.uint8, count=p.line_size * p.height).reshape(p.height, p.line_size)[:, : p.width]


@lru_cache(maxsize=64)
def _bands(n: int, m: int) -> tuple:
    """For exact area means along one axis: per output band, the whole source rows [start, stop) and the
    partly covered boundary rows with their weights."""
    out = []
    for i in range(m):
        a, b = i * n / m, (i + 1) * n / m
        s, e = int(np.ceil(a)), int(np.floor(b))
        if e < s:  # the band lies inside one source row (upsampling a tiny plane)
            out.append((s, s, ((e, b - a),)))
            continue
        extra = []
        if s > a:
            extra.append((int(np.floor(a)), s - a))
        if b > e and e < n:
            extra.append((e, b - e))
        out.append((s, max(s, e), tuple(extra)))
    return tuple(out)


def plane_means(plane: np.ndarray, m: int = PIXELS_GRID) -> np.ndarray:
    """(m, m) exact area means of a uint8 plane, in float64.

    Rows first, with integer sums (uint16 while a band holds at most 257 rows, so no overflow), the partly
    covered boundary rows of a size that m does not divide added with their weights; then the columns of
    the (m, W) band sums with `area_weights`.  numpy only: ~50 us for a 640 x 360 yuv420p frame on one core."""
    h, w = plane.shape
    per = -(-h // m)
    acc = np.uint16 if (per + 1) * 255 < 65536 else np.uint32
    if h % m == 0:
        rows = np.add.reduce(plane.reshape(m, per, w), axis=1, dtype=acc)
        if w % m == 0:  # the common case: integer sums throughout, one division
            return rows.reshape(m, m, w // m).sum(2, dtype=np.int64) / float(per * (w // m))
        rows = rows.astype(np.float64)
    else:
        rows = np.empty((m, w), dtype=np.float64)
        for i, (s, e, extra) in enumerate(_bands(h, m)):
            rows[i] = np.add.reduce(plane[s:e], axis=0, dtype=acc) if e > s else 0.0
            for r, wt in extra:
                rows[i] += wt * plane[r]
    if w % m == 0:
        return rows.reshape(m, m, w // m).sum(2) / ((h / m) * (w // m))
    return (rows @ area_weights(w, m).T) / (h / m)


def _block_sums(p: Any, m: int = PIXELS_GRID) -> np.ndarray | None:
    """(m, m) integer sums of a decoded plane whose height and width m divides (nearly every video), else
    None: one uint16 pass over the rows straight from the frame's buffer (padding columns included, cut
    after), then the columns of the (m, W) result.  ~16 us for a 640 x 360 luma plane."""
    h, w, ls = p.height, p.width, p.line_size
    if h % m or w % m:
        return None
    per = h // m
    a = np.frombuffer(p, np.uint8, count=ls * h).reshape(m, per, ls)
    r = np.add.reduce(a, axis=1, dtype=np.uint16 if per <= 257 else np.uint32)
    return r[:, :w].reshape(m, m, w // m).sum(2, dtype=np.int64)


class PixelExtractor:
    """`--model pixels`: 4 x 4 area-resized RGB in [0, 1], (y, x, channel) order, 48 values per frame."""

    dim = PIXELS_GRID * PIXELS_GRID * 3
    pooling = "area4x4"
    # No decoding thread: a frame's means take a fraction of its decoding, and handing each frame across
    # threads (the GIL) cost more than the overlap gained (measured, docs/benchmarks.md).
    prefetch = 0

    def record(self) -> dict:
        return {"kind": PIXELS, "model": PIXELS, "path": None, "weights_sha256": None, "class": None,
                "pooling": self.pooling, "dim": self.dim}

    def prepare(self, frame: Any) -> tuple:
        """Per frame, the least work: (per-plane 4 x 4 sums or means, their divisors, colour matrix, full range);
        frames of non-YUV formats come back as RGB in [0, 1] with colour matrix -1.  `embed` finishes a batch."""
        fmt = frame.format.name
        if fmt in _PLANAR_YUV:
            full = _PLANAR_YUV[fmt][2] or int(frame.color_range) == 2  # AVCOL_RANGE_JPEG
            y, u, v = frame.planes[:3]
            sums = (_block_sums(y), _block_sums(u), _block_sums(v))
            if sums[0] is not None and sums[1] is not None and sums[2] is not None:
                div = ((y.height // PIXELS_GRID) * (y.width // PIXELS_GRID),
                       (u.height // PIXELS_GRID) * (u.width // PIXELS_GRID))
                return sums, div, int(frame.colorspace), full
            return (plane_means(_plane(y)), plane_means(_plane(u)), plane_means(_plane(v))), (1, 1), \
                int(frame.colorspace), full
        return area_resize(frame.to_ndarray(format="rgb24")) / 255.0, None, -1, True

    def embed(self, prepared: Sequence[tuple]) -> np.ndarray:
        out = np.empty((len(prepared), PIXELS_GRID, PIXELS_GRID, 3))
        groups: dict[tuple, list[int]] = {}
        for i, (_, div, cs, full) in enumerate(prepared):  # one group per video, unless its stream changes
            groups.setdefault((div, cs, full), []).append(i)
        for (div, cs, full), idx in groups.items():
            if cs == -1:
                out[idx] = np.stack([prepared[i][0] for i in idx])
                continue
            yuv = np.empty((len(idx), PIXELS_GRID, PIXELS_GRID, 3))
            for c in range(3):
                yuv[..., c] = np.stack([prepared[i][0][c] for i in idx]) / div[min(c, 1)]
            out[idx] = yuv_to_rgb(yuv, cs, full)
        return out.reshape(len(prepared), self.dim).astype(np.float32)


# ------------------------------------------------------------------------------------ Hugging Face
def weights_sha256(folder: str | Path) -> str:
    """sha256 over the model folder's weight files (top level, sorted by name): `name:sha256\\n` per file."""
    from ..data.shards import sha256_file

    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise DataError(f"--model {folder}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in the folder")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{sha256_file(p)}\n".encode())
    return h.hexdigest()


def resolve_device(device: str | None) -> str:
    """`auto`: this process's GPU (LOCAL_RANK under `accelerate launch`) when there is one, else the CPU."""
    import torch

    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
        return "cpu"
    return device


class HFImageExtractor:
    """Any local Hugging Face image model with its image processor; one pooled vector per frame."""

    # No decoding thread either: on 2 CPU cores it measured 146 against 171 frames/s (tiny CLIP, best of 4);
    # torch already uses both cores.  `extract_video(..., prefetch=N)` turns it on (e.g. to try with a GPU).
    prefetch = 0

    def __init__(self, path: str | Path, device: str | None = None, expect_sha256: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch

        folder = Path(path)
        if not folder.is_dir() or not (folder / "config.json").is_file():
            raise DataError(f"--model {path}: not a local Hugging Face model folder (config.json + weights + "
                            "preprocessor_config.json) and not 'pixels'; nothing is downloaded at run time")
        self.path = folder.resolve()
        self.sha256 = weights_sha256(folder)
        if expect_sha256 and expect_sha256 != self.sha256:
            raise DataError(f"image model at {folder} has weights sha256 {self.sha256[:12]}..., not the "
                            f"{expect_sha256[:12]}... the features were extracted with")
        from transformers import AutoImageProcessor, AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            self.processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
            model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"--model {path}: cannot load the image model or its processor: {e}") from None
        self.class_name = type(model).__name__
        if hasattr(model, "vision_model") and hasattr(model, "get_image_features"):
            model = model.vision_model  # CLIP/SigLIP full model: its vision tower
        self.device = torch.device(resolve_device(device))
        self.model = model.eval().to(self.device)
        blank = np.zeros((32, 32, 3), dtype=np.uint8)
        self.pooling = None
        self.dim = int(self._forward([blank]).shape[1])

    def _forward(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt")
        with torch.inference_mode():
            out = self.model(pixel_values=inputs["pixel_values"].to(self.device))
        if self.pooling is None:
            if getattr(out, "pooler_output", None) is not None:
                self.pooling = "pooler_output"
            elif getattr(out, "image_embeds", None) is not None:
                self.pooling = "image_embeds"
            elif getattr(out, "last_hidden_state", None) is not None:
                self.pooling = "mean_last_hidden_state"
            else:
                raise DataError(f"--model {self.path}: its output has no pooler_output, image_embeds or "
                                "last_hidden_state")
        if self.pooling == "mean_last_hidden_state":
            x = out.last_hidden_state.float()
            x = x.mean(1) if x.ndim == 3 else x.flatten(2).mean(2)  # tokens, or a conv map (B, C, H, W)
        else:
            x = getattr(out, self.pooling).float()
            x = x.flatten(1)
        return x.cpu().numpy().astype(np.float32)

    def record(self) -> dict:
        # name + weights sha256, never a machine path (manifests and checkpoints travel between machines)
        return {"kind": "hf-image", "model": self.path.name, "path": None, "weights_sha256": self.sha256,
                "class": self.class_name, "processor": type(self.processor).__name__, "pooling": self.pooling,
                "dim": self.dim}

    def prepare(self, frame: Any) -> np.ndarray:
        return frame.to_ndarray(format="rgb24")

    def embed(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        if not len(prepared):
            return np.zeros((0, self.dim), np.float32)
        return self._forward(prepared)


def load_extractor(model: str, device: str | None = None, expect_sha256: str | None = None):
    """`pixels` or a local Hugging Face folder."""
    if model == PIXELS:
        return PixelExtractor()
    return HFImageExtractor(model, device, expect_sha256)


def extractor_record(extractor, fps: float, frames_per_snippet: int, layout: str) -> dict:
    """The features manifest's `extractor` (what shards and checkpoints carry; see data/features_manifest)."""
    return {**extractor.record(), "fps": float(fps), "frames_per_snippet": int(frames_per_snippet) or None,
            "layout": layout, "frame_pooling": (f"mean of the {frames_per_snippet} frames nearest to evenly "
                                                "spaced times" if frames_per_snippet else "mean of all frames"),
            "empty_bins": "nearest frame to the bin centre", "timing": "(pts - start_time) x time_base",
            "duration": "video stream, else container, else last packet", "wsra_dist_version": __version__}

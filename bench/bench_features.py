"""`wsra-dist features` throughput against a bare PyAV decode loop of the same files, in one run.

    python bench/bench_features.py [--videos 6] [--seconds 20] [--size 640x360] [--repeats 5]

Videos: H.264 (libx264, preset medium, CRF 23, yuv420p, 30 fps) written with PyAV into a temp folder: a
panning random texture (6-pixel cells, bilinear), a moving coloured box and per-frame sensor noise (+-12),
about 0.7 Mbit/s at 640x360 like web video of that size, so the decoder has residuals and motion to work on.
`--flat` (16-pixel cells, noise +-6: ~0.15 Mbit/s) decodes about twice as fast; the extractor's cost per
frame does not change, so its ratio drops.

Rows (frames/s = decoded frames / wall seconds, best and median of --repeats, the runs interleaved so a
busy neighbour hurts every row alike):
  bare decode     `for frame in container.decode(stream): pass` over every file, nothing else
  features pixels `run_features(..., "pixels", layout charades)`: the whole command minus process start -
                  listing, source sha256, decoding, the 4 x 4 means, snippet pooling, .npy writing, journal
                  and manifest (a fresh --out each run)
  ... + decode thread   the same with frames decoded ahead in a helper thread (prefetch 16)
  tiny HF model   a random CLIPVisionModel (hidden 32, 2 layers, 32 x 32 input) with its (PIL) image
                  processor, batch 32, every frame, on the first video only
Ratio = features frames/s / bare decode frames/s (target >= 0.8: extraction, pooling and writing cost
under 20 % over decoding).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def machine() -> str:
    import av
    import torch

    from machine import describe

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (describe() + f"; Python {platform.python_version()}, PyAV {av.__version__}, torch {torch.__version__}, "
            f"numpy {np.__version__}; load average at start {load:.2f}")


def write_videos(folder: Path, n: int, seconds: int, w: int, h: int, rate: int = 30, flat: bool = False) -> list[Path]:
    import av

    cell, noise = (16, 6) if flat else (6, 12)

    out = []
    for v in range(n):
        rng = np.random.default_rng(v)
        small = rng.random((h // cell + 2, w // cell + 2, 3))
        # smooth texture: bilinear upsampling of a coarse random grid, wider than the frame so it can pan
        ys, xs = np.linspace(0, small.shape[0] - 1.001, h), np.linspace(0, small.shape[1] - 1.001, 2 * w)
        y0, x0 = ys.astype(int), xs.astype(int)
        fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
        tex = ((1 - fy) * ((1 - fx) * small[y0][:, x0] + fx * small[y0][:, x0 + 1])
               + fy * ((1 - fx) * small[y0 + 1][:, x0] + fx * small[y0 + 1][:, x0 + 1]))
        tex = (40 + 170 * tex).astype(np.int16)
        path = folder / f"video{v:02d}.mp4"
        c = av.open(str(path), "w")
        s = c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "23", "preset": "medium"}
        for i in range(seconds * rate):
            x = (3 * i) % w
            img = tex[:, x:x + w].copy()
            bx = int((w - 80) * (0.5 + 0.5 * np.sin(i / 20)))
            img[h // 3:h // 3 + 60, bx:bx + 80] = (200, 40, 40)
            img += rng.integers(-noise, noise + 1, img.shape, dtype=np.int16)  # sensor noise
            f = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        c.close()
        out.append(path)
    return out


def bare_decode(paths: list[Path]) -> tuple[int, float]:
    import av

    t = time.perf_counter()
    n = 0
    for p in paths:
        with av.open(str(p)) as c:
            for _ in c.decode(c.streams.video[0]):
                n += 1
    return n, time.perf_counter() - t


def features(folder: Path, out: Path, prefetch: int | None) -> tuple[int, float]:
    from wsra_dist.video.run import run_features

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    s = run_features(folder, "pixels", 1.0, "charades", out, progress=False, prefetch=prefetch)
    dt = time.perf_counter() - t
    assert s.written == len(list(folder.glob("*.mp4"))) and not s.failures
    return s.frames, dt


def tiny_hf(folder: Path, video: Path) -> tuple[int, float, str]:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from wsra_dist.video.extract import HFImageExtractor
    from wsra_dist.video.pipeline import Spec, extract_video

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8)
    CLIPVisionModel(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    ex = HFImageExtractor(folder)
    t = time.perf_counter()
    _, rec = extract_video(video, ex, Spec("charades", 1.0, 0, 32))
    return rec["frames_decoded"], time.perf_counter() - t, str(ex.device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=6)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--flat", action="store_true", help="coarser texture, less noise: ~0.15 Mbit/s, decodes ~2x faster")
    a = ap.parse_args()
    w, h = (int(x) for x in a.size.split("x"))
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "v").mkdir()
        t = time.perf_counter()
        paths = write_videos(tmp / "v", a.videos, a.seconds, w, h, flat=a.flat)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"videos: {a.videos} x {a.seconds} s, {w}x{h} yuv420p H.264 (libx264 CRF 23, medium) at 30 fps, "
              f"{a.videos * a.seconds * 30} frames, {mb:.1f} MB ({8 * mb / (a.videos * a.seconds):.2f} Mbit/s); "
              f"written in {time.perf_counter() - t:.0f} s")
        rows: dict[str, list[float]] = {"bare decode": [], "features pixels": [], "features pixels + decode thread": []}
        bare_decode(paths)  # warm the page cache and the codec
        for _ in range(a.repeats):
            n, dt = bare_decode(paths)
            rows["bare decode"].append(n / dt)
            n2, dt = features(tmp / "v", tmp / "out", None)
            assert n2 == n
            rows["features pixels"].append(n2 / dt)
            n3, dt = features(tmp / "v", tmp / "out", 16)
            rows["features pixels + decode thread"].append(n3 / dt)
        base_best, base_med = max(rows["bare decode"]), statistics.median(rows["bare decode"])
        print(f"{'':34} {'best fps':>9} {'median fps':>11} {'ratio (best)':>13} {'ratio (median)':>15}")
        for k, v in rows.items():
            print(f"{k:34} {max(v):9.0f} {statistics.median(v):11.0f} {max(v) / base_best:13.3f} "
                  f"{statistics.median(v) / base_med:15.3f}")
        n, dt, dev = tiny_hf(tmp / "clip", paths[0])
        print(f"{'tiny HF model (CLIPVisionModel)':34} {n / dt:9.0f}   ({n} frames of one video, batch 32, {dev})")


if __name__ == "__main__":
    main()

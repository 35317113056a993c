"""Shard size against the official features, and reading rate of stock WebDataset, this repo's reader
and a raw sequential read of the same tar bytes (format wsra-dist-shards/2: one sample per video).

    python bench/bench_shards.py [--videos 400] [--shard-size 100] [--repeats 5]

Planted official-format data (`wsra_dist.data.synthetic.synth`) is written to a temp folder and sharded
with the real writers (`shard_didemo`, `shard_charades`, bundled local text model), training split only.

Size: shard bytes / (Σ over videos of the official feature array as float32 - DiDeMo 6 x ΣD x 4,
Charades-STA T x D x 4 - + Σ over queries of Dt x 4); target <= 1.10.  For reference, the payload the
v1 layout (one sample per query) would have needed, computed arithmetically: DiDeMo 21 x 2ΣD x 4 per
query, Charades-STA the video's T x D x 4 per query, each + Dt x 4 (tar headers and json not counted).

Reading: every reader yields the same videos as numpy arrays (stock `webdataset.WebDataset(urls,
shardshuffle=False).decode()`; `shards.iter_shard`, webdataset's tar_file_expander + group_by_keys + an
allow-list decoder + shape checks; raw = sequential 1 MiB `read()`s), warm (page cache filled, best of
--repeats after a warm-up pass) and cold (`posix_fadvise(DONTNEED)` on every shard before each pass,
best of --repeats; the page-cache residency left after the drop is printed, measured with mincore).
Ratios are against the raw read in the same cache state.  MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import mmap
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def machine() -> str:
    import torch
    import webdataset

    from machine import describe

    return (describe() + "; "
            f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"webdataset {webdataset.__version__}")


# ------------------------------------------------------------------------------------ page cache
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def resident_fraction(paths: list[str]) -> float:
    """Fraction of the files' pages in the page cache (mincore on a read-only mapping; nan if unavailable)."""
    page = mmap.PAGESIZE
    mmap_ = _libc.mmap
    mmap_.restype = ctypes.c_void_p
    mmap_.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    res = tot = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        n = (size + page - 1) // page
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = mmap_(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return float("nan")
            try:
                vec = (ctypes.c_ubyte * n)()
                if _libc.mincore(addr, size, vec) != 0:
                    return float("nan")
                res += sum(v & 1 for v in vec)
                tot += n
            finally:
                _libc.munmap(addr, size)
        finally:
            os.close(fd)
    return res / tot if tot else float("nan")


def drop_cache(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------ data
def write_planted(profile: str, root: Path, videos: int, shard_size: int,
                  compress: bool = False) -> tuple[Path, float, Path]:
    """Official-format files -> shards of the training split; returns (shard dir, seconds, data dir)."""
    from wsra_dist.data.pack import shard_charades, shard_didemo
    from wsra_dist.data.synthetic import synth

    data = root / profile / "data"
    out = root / profile / ("shards-gz" if compress else "shards")
    if not data.is_dir():
        synth(profile, data, videos, 0)
    t = time.perf_counter()
    if profile == "didemo":
        shard_didemo(data / "train_data.json", [str(data / "average_global_flow.h5")], out, shard_size,
                     progress=False, cache_dir=str(root / "cache"), compress=compress)
    else:
        shard_charades(data / "charades_sta_train.txt", data / "Charades_v1_train.csv", data / "features", out,
                       shard_size, progress=False, cache_dir=str(root / "cache"), compress=compress)
    return out, time.perf_counter() - t, data


def source_shapes(profile: str, data: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    """(rows, dim) of each video's official feature array, read from the official files."""
    if profile == "didemo":
        import h5py

        with h5py.File(data / "average_global_flow.h5", "r") as h5:
            return {n: tuple(h5[n].shape) for n in names}
    return {n: tuple(np.load(data / "features" / f"{n}.npy", mmap_mode="r").shape) for n in names}


def size_report(profile: str, shard_dir: Path, data: Path) -> dict:
    from wsra_dist.data.shards import iter_shard, load_manifest

    man = load_manifest(shard_dir)
    urls = [str(shard_dir / s["name"]) for s in man["shards"]]
    queries_of: dict[str, int] = {}
    for u, s in zip(urls, man["shards"]):
        for smp in iter_shard(u, man, s["sha256"]):
            queries_of[smp["meta.json"]["video"]] = len(smp["meta.json"]["queries"])
    shapes = source_shapes(profile, data, list(queries_of))
    Dt = man["dims"]["text"]
    Q = sum(queries_of.values())
    video_src = sum(r * d * 4 for r, d in shapes.values())
    text_src = Q * Dt * 4
    source = video_src + text_src
    if profile == "didemo":
        sum_d = sum(man["dims"]["modalities"])
        cand = 21 * (2 * sum_d + (2 if man["dims"].get("tef") else 0)) * 4
        v1 = Q * (cand + Dt * 4)
    else:
        v1 = sum(q * (shapes[v][0] * shapes[v][1] * 4 + Dt * 4) for v, q in queries_of.items())
    members = {"video.npy": 0, "text.npy": 0, "meta.json": 0}
    for u in urls:
        with tarfile.open(u, "r") as tf:
            for m in tf:
                members[m.name.split(".", 1)[1]] += m.size
    total = sum(os.path.getsize(u) for u in urls)
    return {"profile": profile, "videos": len(queries_of), "queries": Q, "video_src": video_src, "text_src": text_src,
            "source": source, "shards": total, "members": members, "v1": v1, "urls": urls, "manifest": man,
            "shapes": sorted({d for _, d in shapes.values()}), "rows": sorted({r for r, _ in shapes.values()})}


# ------------------------------------------------------------------------------------ readers
def readers(urls: list[str], man: dict):
    import webdataset as wds

    from wsra_dist.data import shards as S
    from wsra_dist.data.shards import iter_shard

    shas = [s["sha256"] for s in man["shards"]]

    def raw() -> int:
        n = 0
        for u in urls:
            with open(u, "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    n += len(chunk)
        return n

    def raw_sha() -> int:
        n = 0
        for u in urls:
            h = hashlib.sha256()
            with open(u, "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    n += len(chunk)
            h.hexdigest()
        return n

    def stock() -> int:
        n = 0
        ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
        for s in ds:
            assert s["video.npy"].dtype == np.float32 and s["text.npy"].ndim == 2 and "queries" in s["meta.json"]
            n += 1
        return n

    def ours(verify: bool):
        def run() -> int:
            S._VERIFIED.clear()  # every pass pays for the sha256 when verify is on
            n = 0
            for u, sha in zip(urls, shas):
                for _ in iter_shard(u, man, sha if verify else None):
                    n += 1
            return n
        return run

    return [
        ("raw sequential read (1 MiB reads)", raw, "raw"),
        ("raw read + sha256", raw_sha, "raw"),
        ("stock wds.WebDataset(urls).decode()", stock, "wds"),
        ("iter_shard, no checksum", ours(False), "ours"),
        ("iter_shard, sha256 checked (every pass)", ours(True), "ours"),
    ]


def time_reader(fn, urls: list[str], repeats: int, cold: bool) -> tuple[float, float]:
    """(best seconds, page-cache residency before the timed passes; cold: after the drop)."""
    if not cold:
        fn()  # warm-up: page cache, imports
    ts, resid = [], []
    for _ in range(repeats):
        if cold:
            drop_cache(urls)
            resid.append(resident_fraction(urls))
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    if not cold:
        resid.append(resident_fraction(urls))
    return min(ts), max(resid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=400, help="planted training videos per benchmark")
    ap.add_argument("--shard-size", type=int, default=100, help="videos per shard")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per reader and cache state (best is kept)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the text encoder (does not affect reading)")
    ap.add_argument("--workdir", default=None, help="parent folder of the temp folder (must be a real disk, not "
                    "tmpfs, for the cold-cache passes); default: the system temp folder")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    print(machine())
    print(f"{a.videos} planted training videos per benchmark, {a.shard_size} videos per shard, best of {a.repeats}; "
          f"torch threads {a.threads}")
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        reports = []
        for profile in ("didemo", "charades"):
            d, t_write, data = write_planted(profile, Path(tmp), a.videos, a.shard_size)
            r = size_report(profile, d, data)
            r["t_write"] = t_write
            dz, r["t_write_gz"], _ = write_planted(profile, Path(tmp), a.videos, a.shard_size, compress=True)
            r["gz"] = size_report(profile, dz, data)
            reports.append(r)

        print("\n== size: shard bytes against the official features (+ one text row per query) ==")
        print(f"{'benchmark':10s} {'videos':>6s} {'queries':>7s} {'video src MB':>12s} {'text MB':>8s} {'shards MB':>9s} "
              f"{'shards/src':>10s} {'target':>7s} {'v1 MB':>8s} {'v1/src':>7s} {'v1/v2':>6s}")
        for r in reports:
            ratio = r["shards"] / r["source"]
            print(f"{r['profile']:10s} {r['videos']:6d} {r['queries']:7d} {r['video_src'] / 1e6:12.2f} "
                  f"{r['text_src'] / 1e6:8.2f} {r['shards'] / 1e6:9.2f} {ratio:10.3f} "
                  f"{'met' if ratio <= 1.1 else 'NOT MET':>7s} {r['v1'] / 1e6:8.1f} {r['v1'] / r['source']:7.2f} "
                  f"{r['v1'] / r['shards']:6.2f}")
            z = r["gz"]["shards"]
            print(f"{r['profile'] + ' --compress':21s} {'':>4s}{r['video_src'] / 1e6:12.2f} {r['text_src'] / 1e6:8.2f} "
                  f"{z / 1e6:9.2f} {z / r['source']:10.3f} {'met' if z / r['source'] <= 1.1 else 'NOT MET':>7s}   "
                  f"(gzip level 1: {z / r['shards']:.3f} of the plain tar; sharding {r['t_write_gz']:.1f} s)")
        for r in reports:
            m = r["members"]
            other = r["shards"] - sum(m.values())
            print(f"  {r['profile']}: feature rows {r['rows'][0]}..{r['rows'][-1]} x dim {r['shapes']}, text dim "
                  f"{r['manifest']['dims']['text']}; shard bytes = video.npy {m['video.npy'] / 1e6:.2f} MB + text.npy "
                  f"{m['text.npy'] / 1e6:.2f} MB + meta.json {m['meta.json'] / 1e6:.3f} MB + tar headers/padding "
                  f"{other / 1e6:.3f} MB; sharding (text encoding included) {r['t_write']:.1f} s, "
                  f"{r['videos'] / r['t_write']:.0f} videos/s")

        print("\n== reading: every video decoded to numpy (MB/s of shard bytes) ==")
        for r in reports:
            urls, man = r["urls"], r["manifest"]
            mb = r["shards"] / 1e6
            rows = []
            for cold in (False, True):
                for name, fn, kind in readers(urls, man):
                    t, resid = time_reader(fn, urls, a.repeats, cold)
                    rows.append((cold, name, kind, t, resid))
            print(f"\n{r['profile']}: {r['videos']} videos, {len(urls)} shards, {mb:.1f} MB")
            print(f"{'cache':5s} {'reader':42s} {'videos/s':>9s} {'MB/s':>8s} {'vs raw':>7s} {'vs stock':>8s} "
                  f"{'cached':>7s}")
            for cold in (False, True):
                base = {k: t for c, n, k, t, _ in rows if c == cold and n.startswith("raw sequential")}["raw"]
                stock_t = [t for c, n, k, t, _ in rows if c == cold and k == "wds"][0]
                for c, name, kind, t, resid in rows:
                    if c != cold:
                        continue
                    vs_stock = f"{stock_t / t:8.2f}" if kind == "ours" else " " * 8
                    print(f"{'cold' if cold else 'warm':5s} {name:42s} {r['videos'] / t:9.0f} {mb / t:8.0f} "
                          f"{base / t:7.2f} {vs_stock} {resid * 100:6.0f}%")
        print("\n== reading --compress shards (gzip, warm cache): every video decoded to numpy ==")
        for r in reports:
            z = r["gz"]
            rows = [(name, time_reader(fn, z["urls"], a.repeats, False)[0]) for name, fn, kind in
                    readers(z["urls"], z["manifest"]) if kind != "raw"]
            plain = {name: time_reader(fn, r["urls"], a.repeats, False)[0] for name, fn, kind in
                     readers(r["urls"], r["manifest"]) if kind != "raw"}
            for name, t in rows:
                print(f"warm  {r['profile']:9s} {name:42s} {r['videos'] / t:9.0f} videos/s  vs plain tar "
                      f"{plain[name] / t:5.2f}")
        print("\n(vs raw: raw time / reader time in the same cache state; vs stock: stock WebDataset time / "
              "iter_shard time; cached: share of the shard pages in the page cache when the timed passes began)")


if __name__ == "__main__":
    main()

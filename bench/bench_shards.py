"""Shard writing rate, and reading + decoding rate against a raw sequential read of the same tar bytes.

    python bench/bench_shards.py [--samples 1500] [--snippets 21] [--dim 2048]

All numbers come from one run on the same files (page cache warm for every reader: the raw read
goes first and each reader gets a warm-up pass).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from wsra_dist.data.loader import EpochLoader, ShardSource
    from wsra_dist.data.shards import ShardWriter, encode_sample, iter_shard, load_manifest

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1500)
    ap.add_argument("--snippets", type=int, default=21, help="T per sample (21 = DiDeMo candidates)")
    ap.add_argument("--dim", type=int, default=2048, help="feature dim (2 x 1024 = DiDeMo flow global+local)")
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    video = rng.standard_normal((a.snippets, a.dim)).astype(np.float32)
    text = rng.standard_normal(384).astype(np.float32)
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores; {a.samples} samples of "
          f"({a.snippets}, {a.dim}) float32")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "shards"
        t = time.perf_counter()
        w = ShardWriter(d, a.shard_size)
        for i in range(a.samples):
            meta = {"query_id": i, "video": f"v{i // 4}.mov", "video_hash": i // 4, "times": [[1, 2]] * 4,
                    "duration": 30.0, "num_segments": 6, "target": 3}
            w.write(f"{i:08d}", encode_sample(video, text, meta, "a man opens the door."))
        m = w.finish({"benchmark": "didemo", "num_queries": a.samples, "num_videos": a.samples // 4,
                      "dims": {"video": a.dim, "text": 384}})
        t_write = time.perf_counter() - t
        total = m["total_bytes"]
        mb = total / 2**20
        print(f"write (incl. npy encoding, sha256, atomic rename): {a.samples / t_write:8.0f} samples/s "
              f"{mb / t_write:8.1f} MB/s")
        urls = [str(d / s["name"]) for s in m["shards"]]
        man = load_manifest(d)

        def raw():
            n = 0
            for u in urls:
                with open(u, "rb", buffering=0) as f:
                    while chunk := f.read(1 << 20):
                        n += len(chunk)
            return n

        def decoded(verify: bool, touch: bool = False):
            from wsra_dist.data import shards as S

            S._VERIFIED.clear()  # every pass pays for the sha256 when verify is on
            n = 0
            for u, s in zip(urls, man["shards"]):
                for smp in iter_shard(u, s["sha256"] if verify else None, man["dims"]):
                    if touch:  # a copy of every array, as any consumer of the bytes pays
                        np.array(smp["video.npy"])
                        np.array(smp["text.npy"])
                    n += 1
            return n

        def batches():
            src = ShardSource.open(str(d))
            n = 0
            for b in EpochLoader(src, 42, shuffle=False, verify=True).epoch(0):
                n += b.video.shape[0]
            return n

        def best(fn):
            fn()  # warm-up (page cache, imports)
            ts = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            return min(ts)

        t_raw = best(raw)
        rows = [("raw sequential read of the tar bytes", t_raw)]
        rows.append(("read + decode (zero-copy views)", best(lambda: decoded(False))))
        rows.append(("read + decode + copy of every array", best(lambda: decoded(False, True))))
        rows.append(("read + decode + copy + sha256 (first read)", best(lambda: decoded(True, True))))
        rows.append(("loader: padded batches of 42 (sha256 cached)", best(batches)))
        print(f"{'reader':48s} {'samples/s':>10s} {'MB/s':>9s} {'vs raw':>7s}")
        for name, t in rows:
            print(f"{name:48s} {a.samples / t:10.0f} {mb / t:9.0f} {t_raw / t:7.2f}")


if __name__ == "__main__":
    main()

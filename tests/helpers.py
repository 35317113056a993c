"""Small planted datasets shared by tests (written once per session under a temp folder)."""

from __future__ import annotations

from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_planted_didemo(root: Path, videos: int = 40, shard_size: int = 50, seed: int = 0) -> Path:
    from wsra_dist.data.pack import shard_didemo
    from wsra_dist.data.synthetic import synth

    synth("didemo", root / "data", videos, seed)
    for s in ("train", "val", "test"):
        shard_didemo(root / "data" / f"{s}_data.json", [str(root / "data" / "average_global_flow.h5")],
                     root / "shards" / s, shard_size, progress=False, cache_dir=str(root / "cache"))
    return root


def make_planted_charades(root: Path, videos: int = 30, shard_size: int = 40, seed: int = 0) -> Path:
    from wsra_dist.data.pack import shard_charades
    from wsra_dist.data.synthetic import synth

    synth("charades", root / "data", videos, seed)
    for s in ("train", "test"):
        shard_charades(root / "data" / f"charades_sta_{s}.txt", root / "data" / f"Charades_v1_{s}.csv",
                       root / "data" / "features", root / "shards" / s, shard_size, progress=False,
                       cache_dir=str(root / "cache"))
    return root

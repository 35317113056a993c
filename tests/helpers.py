"""Small planted datasets shared by tests (written once per session under a temp folder)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

def _find_shared() -> Path:
    """The real annotation files: $WSRA_SHARED_DATA, else `shared/data` beside the repo or an ancestor
    (`../shared` from the repo root); tests that need them skip when neither exists."""
    import os

    if os.environ.get("WSRA_SHARED_DATA"):
        return Path(os.environ["WSRA_SHARED_DATA"])
    for parent in Path(__file__).resolve().parents:
        cand = parent / "shared" / "data"
        if (cand / "didemo" / "val_data.json").is_file():
            return cand
    return Path(__file__).resolve().parents[2] / "shared" / "data"


SHARED = _find_shared()
ROOT = Path(__file__).resolve().parents[1]


def run_checked(cmd, env=None, check=True):
    """Run a command from the repo root (one thread per process); fail with its output tails."""
    import os
    import subprocess

    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def run_cli(*args, check: bool = True, env: dict | None = None):
    """`python -m wsra_dist.cli ARGS` from the repo root (one thread); with `check`, fail with the output tails."""
    import sys

    return run_checked([sys.executable, "-m", "wsra_dist.cli", *map(str, args)], env, check)


def load_weights(run):
    from safetensors.torch import load_file

    return load_file(str(Path(run) / "model.safetensors"))


def max_weight_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def make_planted_didemo(root: Path, videos: int = 40, shard_size: int = 12, seed: int = 0) -> Path:
    from wsra_dist.data.pack import shard_didemo
    from wsra_dist.data.synthetic import synth

    synth("didemo", root / "data", videos, seed)
    for s in ("train", "val", "test"):
        shard_didemo(root / "data" / f"{s}_data.json", [str(root / "data" / "average_global_flow.h5")],
                     root / "shards" / s, shard_size, progress=False, cache_dir=str(root / "cache"))
    return root


def make_planted_charades(root: Path, videos: int = 30, shard_size: int = 10, seed: int = 0) -> Path:
    from wsra_dist.data.pack import shard_charades
    from wsra_dist.data.synthetic import synth

    synth("charades", root / "data", videos, seed)
    for s in ("train", "test"):
        shard_charades(root / "data" / f"charades_sta_{s}.txt", root / "data" / f"Charades_v1_{s}.csv",
                       root / "data" / "features", root / "shards" / s, shard_size, progress=False,
                       cache_dir=str(root / "cache"))
    return root


def requires_shared(fn):
    """Skip (with the reason) when the real annotation files are not on this machine."""
    import pytest

    return pytest.mark.skipif(not (SHARED / "didemo" / "val_data.json").is_file(),
                              reason=f"real annotation files not found at {SHARED} (set WSRA_SHARED_DATA)")(fn)


def reseal_checkpoint(folder: Path) -> None:
    """Rewrite a checkpoint's manifest to match its (tampered) files, as an attacker could: the loaders'
    own safety must hold even when the manifest agrees."""
    import hashlib
    import json

    mf = folder / "checkpoint_manifest.json"
    m = json.loads(mf.read_text())
    files = {}
    for rel, d in m["files"].items():
        p = folder / rel
        if p.is_file():
            files[rel] = {**d, "bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    m["files"] = files
    mf.write_text(json.dumps(m))


@contextlib.contextmanager
def triton_interpret():
    """TRITON_INTERPRET=1 inside, the caller's value after.  Triton reads it when kernels are decorated (at import)
    and when they launch; left set, it leaked into every later subprocess of the session, where
    model.pair_kernel=triton then ran on a CPU."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before

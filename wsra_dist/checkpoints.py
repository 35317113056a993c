"""Complete checkpoints on shared storage: a per-checkpoint manifest, and `latest` = the newest complete one.

Several nodes write one checkpoint folder (each rank its RNG state, ZeRO shards...; rank 0 the
rest).  A folder can be incomplete though its name says done: a node died between its write and the
rename, or the shared file system showed rank 0 a file another node had not finished.  So every rank
reports the size and sha256 of the files it wrote; rank 0 checks it sees the same bytes (waiting a
little for slow shared storage), adds its own files and writes `checkpoint_manifest.json` last,
before the rename.  `resume=latest|auto` takes the newest folder whose manifest lists a file of every
rank and whose files all match it; incomplete ones are skipped with a warning naming what is missing.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

MANIFEST = "checkpoint_manifest.json"
FORMAT = "wsra-dist-checkpoint/1"
_VISIBLE_WAIT_S = 30.0  # how long rank 0 waits for another node's file to show up intact


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def rank_of(name: str) -> int | None:
    """The rank a checkpoint file belongs to by its name (accelerate's RNG states, DeepSpeed's ZeRO shards)."""
    m = re.search(r"random_states_(\d+)\.pkl$", name) or re.search(r"zero_pp_rank_(\d+)_", name)
    return int(m.group(1)) if m else None


def describe_files(folder: Path, rank: int | None = None) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} of the files of `rank` (None: the files of no rank) in `folder`."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST and rank_of(p.name) == rank:
            out[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    return out


def mismatches(folder: Path, files: dict[str, dict]) -> list[str]:
    """What in `folder` differs from `files` ([] when every file is there with its size and sha256)."""
    bad = []
    for rel, d in files.items():
        p = folder / rel
        if not p.is_file():
            bad.append(f"{rel} missing")
        elif p.stat().st_size != d["bytes"]:
            bad.append(f"{rel} has {p.stat().st_size} bytes, not {d['bytes']}")
        elif _sha256(p) != d["sha256"]:
            bad.append(f"{rel} sha256 differs")
    return bad


def write_manifest(folder: Path, world: int, step: int, per_rank: list[dict[str, dict]]) -> None:
    """Rank 0, after every rank has written and reported its files (`per_rank[r]`)."""
    reported = {rel: {**d, "rank": r} for r, files in enumerate(per_rank) for rel, d in files.items()}
    deadline = time.monotonic() + _VISIBLE_WAIT_S
    while (bad := mismatches(folder, reported)) and time.monotonic() < deadline:
        time.sleep(0.5)  # another node's file not yet visible here (shared file system)
    if bad:
        raise OSError(f"{folder}: the files other ranks wrote are not all visible here after {_VISIBLE_WAIT_S:.0f} s "
                      f"({'; '.join(bad[:3])}): is output_dir on storage every node shares?")
    files = {**{rel: {**d, "rank": None} for rel, d in describe_files(folder, None).items()}, **reported}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "world": world, "step": step, "files": files}, indent=1))
    tmp.replace(folder / MANIFEST)


def problems(folder: Path) -> list[str]:
    """Why `folder` is not a complete checkpoint ([] when it is)."""
    try:
        m = json.loads((folder / MANIFEST).read_text())
        files, world = m["files"], int(m["world"])
        assert m.get("format") == FORMAT and isinstance(files, dict)
    except FileNotFoundError:
        return [f"no {MANIFEST} (written last: the checkpoint never finished)"]
    except (ValueError, KeyError, TypeError, AssertionError):
        return [f"{MANIFEST} is unreadable"]
    have = {d.get("rank") for d in files.values()}
    out = [f"no files of rank {r}" for r in range(world) if r not in have]
    return out + mismatches(folder, files)


def latest_complete(root: Path, warn=None) -> Path | None:
    """The newest complete `step-*` folder under `root` (None if none); `warn(text)` for each newer,
    incomplete one passed over."""
    for p in sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True):
        bad = problems(p)
        if not bad:
            return p
        if warn is not None:
            warn(f"{p}: incomplete checkpoint skipped ({'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''})")
    return None

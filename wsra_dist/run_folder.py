"""A training run folder has one owner: a lock for the run's life, and no silent reuse of another run's folder.

* `RunLock`: `output_dir/.wsra-run.lock`, created with O_EXCL (atomic on local and NFSv3+ file systems), holding
  the owner's pid, host, start time and the kernel's start tick of that pid (so a reused pid is not taken for
  the owner).  A second training on the folder stops with one line naming the holder.  A lock whose owner is
  gone (this host, pid not running or running another program) is reported and taken over; a lock of another
  host cannot be checked from here and is refused with the file to delete when the user knows it is stale.
* `previous_run`: what in the folder shows an earlier run (its model, history, recipe, checkpoints).  Training
  there needs `resume=latest|auto|PATH` (continue it) or `overwrite=true` (`clear_previous_run` removes exactly
  those files first); otherwise the trainer refuses before touching anything.  A start that failed before its
  first checkpoint (only recipe.yaml and TensorBoard events) does not block the folder: `set_aside_failed_start`
  moves its files into `failed-start-<time>/` once the new run's start-up checks have passed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from .config import ConfigError

LOCK_FILE = ".wsra-run.lock"
# files an earlier `wsra_dist.train` wrote into its output_dir (events files and checkpoints/ are matched apart)
RUN_FILES = ("model.safetensors", "wsra_model.json", "history.json", "recipe.yaml")
PHASES_DIR = "self_training"  # the earlier phases of a self-training run (wsra_dist/self_training.py)


def _proc_start(pid: int) -> str | None:
    """The kernel's start tick of `pid` (field 22 of /proc/PID/stat), or None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: running
    now = _proc_start(pid)
    return start is None or now is None or now == start  # the same pid, started at another tick: reused


class RunLock:
    """`with RunLock(folder):` -- the folder is this process's until the block ends."""

    def __init__(self, folder: str | Path, warn=print):
        self.path = Path(folder) / LOCK_FILE
        self.warn = warn
        self.held = False
        self.created = False  # the lock made the folder: release removes it again when nothing else was written

    def _record(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "proc_start": _proc_start(os.getpid())}

    def _holder(self) -> dict | None:
        try:
            d = json.loads(self.path.read_text())
            return d if isinstance(d, dict) and isinstance(d.get("pid"), int) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a process killed between create and write: no owner to name

    def acquire(self) -> None:
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lock taken over or removed between our tries: try again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
            self.held = True
            return
        raise ConfigError(f"output_dir {self.path.parent}: could not take its lock {self.path} (it keeps changing)")

    def _handle_existing(self) -> None:
        h = self._holder()
        if h is None:
            return  # released meanwhile
        here = socket.gethostname()
        who = (f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')}" if h else "an unknown process")
        if h and h.get("host") == here and not _alive(h["pid"], h.get("proc_start")):
            self.warn(f"warning: output_dir {self.path.parent}: taking over the stale lock of {who} (not running)")
            self.path.unlink(missing_ok=True)
            return
        if not h:
            age = time.time() - self.path.stat().st_mtime
            if age > 60:  # empty for a minute: its writer died between create and write
                self.warn(f"warning: output_dir {self.path.parent}: taking over an unreadable lock ({age:.0f} s old)")
                self.path.unlink(missing_ok=True)
                return
        other = "" if not h or h.get("host") == here else (" (another host: if you know that run is gone, "
                                                            f"delete {self.path})")
        raise ConfigError(f"output_dir {self.path.parent} is in use by another training ({who}){other}; "
                          "wait for it to end or train into another output_dir")

    def release(self) -> None:
        if self.held:
            h = self._holder()
            if h and h.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
                if self.created:  # a run that failed before writing anything leaves no empty folder behind
                    try:
                        self.path.parent.rmdir()  # only when empty: anything written stays
                    except OSError:
                        pass
            self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def previous_run(folder: str | Path) -> list[str]:
    """Names of what an earlier training left in `folder` ([] for a new or empty folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [n for n in RUN_FILES if (folder / n).exists()]
    ck = folder / "checkpoints"
    if ck.is_dir() and any(ck.glob("step-*")):
        found.append("checkpoints/")
    if (folder / "tensorboard").is_dir() and any((folder / "tensorboard").rglob("events.out.tfevents*")):
        found.append("tensorboard/")
    if _phases_started(folder / PHASES_DIR):
        found.append(f"{PHASES_DIR}/")
    return found


def _phases_started(phases: Path) -> bool:
    """A self-training run's earlier phases hold a run or labels (a teacher's failed start alone does not count:
    the next start sets it aside, as for any run)."""
    if not phases.is_dir():
        return False
    for d in phases.iterdir():
        found = previous_run(d) if d.is_dir() else []
        if (found and not is_failed_start(found)) or (d / "manifest.json").is_file() or d.name == "summary.json":
            return True
    return False


# What a start that failed before its first checkpoint leaves (the recipe and TensorBoard are written just before
# the first step): no model, no history, no checkpoint, so nothing to continue and nothing finished to protect.
FAILED_START = ("recipe.yaml", "tensorboard/")


def is_failed_start(found: list[str]) -> bool:
    return bool(found) and set(found) <= set(FAILED_START)


def set_aside_failed_start(folder: str | Path) -> Path | None:
    """A failed start's files are moved (not deleted) into `folder/failed-start-<time>/`, so the next run into the
    folder starts clean and TensorBoard shows the failed attempt as a run of its own; None when there are none."""
    folder = Path(folder)
    found = previous_run(folder)
    if not is_failed_start(found):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime((folder / "recipe.yaml").stat().st_mtime
                                                          if (folder / "recipe.yaml").exists() else time.time()))
    dest, n = folder / f"failed-start-{stamp}", 1
    while dest.exists():
        n += 1
        dest = folder / f"failed-start-{stamp}-{n}"
    dest.mkdir()
    for name in ("recipe.yaml", "tensorboard"):
        if (folder / name).exists():
            os.replace(folder / name, dest / name)
    return dest


def clear_previous_run(folder: str | Path, phases: bool = True) -> None:
    """overwrite=true: remove what `previous_run` lists (nothing else the folder holds); `phases=False` keeps the
    self-training phases (the last phase of a self-training run replaces only its own files)."""
    folder = Path(folder)
    if phases:
        shutil.rmtree(folder / PHASES_DIR, ignore_errors=True)
    for n in RUN_FILES:
        (folder / n).unlink(missing_ok=True)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    shutil.rmtree(folder / "tensorboard", ignore_errors=True)


def check_reuse(folder: str | Path, resume: str, overwrite: bool) -> list[str]:
    """Refuse training into a folder with an earlier run unless resumed or overwritten; returns what was found."""
    if resume and overwrite:
        raise ConfigError(f"resume={resume} and overwrite=true contradict each other: resume continues the run in "
                          f"{folder}, overwrite replaces it; set one")
    found = previous_run(folder)
    if found and not resume and not overwrite and not is_failed_start(found):
        raise ConfigError(f"output_dir {folder} holds an earlier run ({', '.join(found)}); continue it with "
                          "resume=latest, replace it with overwrite=true, or train into another output_dir")
    finished = [n for n in ("model.safetensors", "history.json") if n in found]
    if resume == "latest" and finished and "checkpoints/" not in found:
        # latest means "continue": starting over here would silently replace the finished model (auto, by its
        # contract, starts from scratch when there is nothing to resume, and says so)
        raise ConfigError(f"resume=latest: output_dir {folder} holds a finished run ({', '.join(finished)}) but no "
                          "checkpoint to continue from; nothing was changed. Replace the run with overwrite=true "
                          "(without resume=), or train into another output_dir")
    return found


def recipe_path(run_dir: str | Path, src: str) -> str:
    """A path from a run's recipe.yaml (relative paths are as training read them, from the folder it ran in):
    as written when it exists from here (or is a URL / absolute), else from the run folder's parents (a run
    under REPO/runs/NAME trained from REPO), else as written (the caller's error names it)."""
    if not src or "://" in src or Path(src).is_absolute() or Path(src).exists():
        return src
    for base in list(Path(run_dir).resolve().parents)[:3]:
        if (base / src).exists():
            return str(base / src)
    return src

"""Processes that end with their parent: no orphaned trainers or loader workers.

A launcher killed with SIGKILL cannot stop its children: torch elastic starts each worker in a session
of its own, and DataLoader workers only notice a dead parent at their next queue poll (and a
persistent worker blocked in I/O never does).  Measured here: a SIGKILLed trainer's two loader
workers were still alive ten minutes later, and a node whose launcher was killed kept its worker
training with the other node.  Linux's PR_SET_PDEATHSIG makes the kernel deliver SIGKILL to this
process the moment its parent exits; elsewhere a thread polls the parent pid.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def die_with_parent() -> str:
    """Make this process end when its parent does; returns how ("pdeathsig", "poll")."""
    parent = os.getppid()
    how = "poll"
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                how = "pdeathsig"
        except OSError:
            pass
    if how == "poll":
        threading.Thread(target=_poll_parent, args=(parent,), daemon=True, name="wsra-parent-watch").start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    return how


def _poll_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(1.0)


def loader_worker_init(_worker_id: int) -> None:
    """DataLoader worker_init_fn: the worker ends with the trainer that forked it, and leaves Ctrl-C (SIGINT to the
    whole foreground group) and SIGTERM (Slurm signals every process of a job step) to the trainer, which stops
    cleanly after its step (wsra_dist/stop_signals.py).  torch's worker handler would end the worker on a SIGTERM
    from anyone but its parent, and the trainer's next batch would fail with "DataLoader worker exited
    unexpectedly".  The trainer ends its workers itself (torch's shutdown; SIGKILL when they are stuck)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()


def launched_worker() -> bool:
    """True under torchrun / `accelerate launch` (a worker whose parent is the elastic agent)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ

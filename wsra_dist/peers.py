"""Lost peers: when another process dies or hangs, every survivor stops, saying which rank was lost,
in which collective and at which step.

Three mechanisms, each for a failure the others miss:
* the process group's timeout (`train.process_group_timeout_s`, passed to gloo/NCCL at init): a
  collective waiting on a peer that neither answers nor closes its sockets raises after it;
* a heartbeat: a daemon thread adds 1 to `wsra/hb/<rank>` in the rendezvous store every
  `HEARTBEAT_S`; after a failure the ranks whose counter stopped are the lost ones (counters, not
  clocks, so skew between nodes does not matter);
* a watchdog (the same thread): the trainer marks the regions that wait on peers (`watch.region`);
  if one lasts longer than the timeout + `GRACE_S` (a collective blocked outside the group's
  timeout, e.g. NCCL's abort path or a barrier of a library) it prints the line and exits.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

HEARTBEAT_S = 0.5
GRACE_S = 20.0  # the watchdog fires this long after the process group's own timeout
EXIT_PEER_LOST = 3
_PEER_ERRORS = ("connection reset", "connection closed", "connection refused", "broken pipe", "timed out",
                "timeout", "nccl", "socket", "peer", "gloo", "closed by remote", "no route to host")


class PeerLost(RuntimeError):
    """A collective failed because another process is gone or stopped answering."""


class PeerWatch:
    def __init__(self, timeout_s: float, rank: int, world: int, store) -> None:
        self.timeout_s, self.rank, self.world, self.store = float(timeout_s), rank, world, store
        self.where, self.step = "start-up", 0
        self._since: float | None = None  # monotonic start of the current waiting region
        self._stop = threading.Event()
        self._beats = 0
        try:
            store.set(f"wsra/where/{rank}", f"{socket.gethostname()} node {os.environ.get('GROUP_RANK', '?')}")
        except Exception:  # noqa: BLE001 - naming is best effort
            pass
        self._thread = threading.Thread(target=self._run, daemon=True, name="wsra-peer-watch")
        self._thread.start()

    # ---------------------------------------------------------------- the trainer's side
    def at(self, where: str, step: int) -> None:
        self.where, self.step = where, step

    def begin(self, where: str, step: int | None = None) -> None:
        """Start a stretch that waits on every peer (a collective, a barrier, a step with its all-reduces).
        An exception raised before `end()` is a failure inside it (see `explain`)."""
        self.where = where
        if step is not None:
            self.step = step
        self._since = time.monotonic()

    def end(self) -> None:
        self._since = None

    @contextmanager
    def region(self, where: str, step: int | None = None) -> Iterator[None]:
        self.begin(where, step)
        yield  # an exception leaves the region open: explain() sees where it failed
        self.end()

    def close(self) -> None:
        """Stop the thread and wait for it: one still inside a store call while the interpreter shuts
        down aborts the process ("terminate called without an active exception", measured)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # ---------------------------------------------------------------- the thread
    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.store.add(f"wsra/hb/{self.rank}", 1)
                self._beats += 1
            except Exception:  # noqa: BLE001 - the store's host is gone; the watchdog below still runs
                pass
            since = self._since
            if since is not None and time.monotonic() - since > self.timeout_s + GRACE_S:
                self._give_up(f"waited {time.monotonic() - since:.0f} s (train.process_group_timeout_s="
                              f"{self.timeout_s:g} + {GRACE_S:g} s grace) and it never completed")

    def _give_up(self, why: str) -> None:
        from .errors import print_error, should_print

        msg = self.describe(why)
        try:
            if should_print():
                print_error(msg)
        finally:
            sys.stderr.flush()
            os._exit(EXIT_PEER_LOST)

    # ---------------------------------------------------------------- naming the lost
    def lost_ranks(self, wait_s: float = 3 * HEARTBEAT_S + 1.0) -> list[int] | None:
        """Ranks whose heartbeat stopped (None: the store itself is unreachable)."""
        try:
            self.store.set_timeout(timedelta(seconds=3))
            first = {r: int(self.store.add(f"wsra/hb/{r}", 0)) for r in range(self.world) if r != self.rank}
            time.sleep(wait_s)
            later = {r: int(self.store.add(f"wsra/hb/{r}", 0)) for r in first}
        except Exception:  # noqa: BLE001
            return None
        return [r for r in first if later[r] == first[r]]

    def _name(self, r: int) -> str:
        try:
            return f"rank {r} ({self.store.get(f'wsra/where/{r}').decode()})"
        except Exception:  # noqa: BLE001
            return f"rank {r}"

    def describe(self, cause: str) -> str:
        lost = self.lost_ranks()
        me = f"rank {self.rank} of {self.world}"
        if lost is None:
            who = ("the rendezvous store is unreachable: the node of rank 0 (which hosts it) is gone or the network "
                   "is down")
        elif lost:
            who = ", ".join(self._name(r) for r in lost) + " stopped responding"
        else:
            who = "a peer failed (every heartbeat is still running: see that process's own error)"
        return (f"lost peer: {who}; {me} stopped in {self.where} at step {self.step}: {cause}. Relaunch the same "
                "commands with resume=latest (or launch with --max_restarts N and resume=auto)")


_WATCH: PeerWatch | None = None


def start(timeout_s: float) -> PeerWatch | None:
    """Start the watch for this process (a no-op without a process group of two or more)."""
    global _WATCH
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    store = dist.distributed_c10d._get_default_store()
    _WATCH = PeerWatch(timeout_s, dist.get_rank(), dist.get_world_size(), store)
    return _WATCH


def stop(forget: bool = True) -> None:
    """Stop the watch's thread; `forget=False` keeps what it knows for `explain` (the error path)."""
    global _WATCH
    if _WATCH is not None:
        _WATCH.close()
    if forget:
        _WATCH = None


def current() -> PeerWatch | None:
    return _WATCH


def at(where: str, step: int) -> None:
    """Where the trainer is (named if a peer is lost outside a waiting region)."""
    if _WATCH is not None:
        _WATCH.at(where, step)


def begin(where: str, step: int | None = None) -> None:
    if _WATCH is not None:
        _WATCH.begin(where, step)


def end() -> None:
    if _WATCH is not None:
        _WATCH.end()


@contextmanager
def waiting(where: str, step: int | None = None) -> Iterator[None]:
    """`with waiting("checkpoint barrier", step):` -- a region of the current watch (no-op without one)."""
    begin(where, step)
    yield
    end()


def explain(exc: BaseException) -> str | None:
    """The one line for a failed collective (None when `exc` is not one, or no watch is running)."""
    if _WATCH is None or _WATCH._since is None or isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return None  # only failures inside a region that waits on peers
    text = f"{type(exc).__name__}: {exc}".lower()
    if not (isinstance(exc, (RuntimeError, ConnectionError, TimeoutError, OSError)) and
            any(k in text for k in _PEER_ERRORS)):
        return None
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "]" in first[:200] and first.startswith("["):  # gloo prefixes its source location: keep the message
        first = first.split("]", 1)[1].strip()
    first = first.split(". This is typically caused", 1)[0]  # gloo's boilerplate advice
    return _WATCH.describe(first[:300].rstrip("."))

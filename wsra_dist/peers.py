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

And at start-up under torchrun / `accelerate launch`, `init_process_group` gives each launcher round its own
namespace in the launcher's store (a restarted round otherwise reads the killed round's gloo addresses).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
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


# ---------------------------------------------------------------------------------- process-group start-up
ROUND_PREFIX = "wsra/round"  # keys of the start-up handshake in the launcher's store (never under a round's prefix)
_POLL_S = 0.05


class StartupError(RuntimeError):
    """The processes of a (re)started round could not agree on their process group's namespace."""


def init_process_group(backend: str, timeout_s: float) -> bool:
    """Under torch elastic with the agent's shared store (torchrun / `accelerate launch` with the c10d
    rendezvous), create the default process group in a namespace of its own for this round of workers.
    Returns False (and does nothing) elsewhere: accelerate then creates the group as usual.

    Why: the agent of node 0 hosts one TCPStore for the whole job and hands it to every round of
    workers (`TORCHELASTIC_USE_AGENT_STORE=True`, torch/distributed/elastic/rendezvous/dynamic_rendezvous.py
    creates it in the first round only), but a worker's env:// store has no per-round prefix (torch 2.13,
    torch/distributed/rendezvous.py `_create_c10d_store`: "We create a new TCPStore for every retry so no
    need to add prefix for each attempt", which the agent does not do).  Gloo's full-mesh exchange (`default_pg/0//cpu//0/<rank>`)
    and NCCL's unique id are then read from the previous round's keys whenever a peer of the new round has
    not written its own yet: the connect goes to a dead worker's port ("Gloo connectFullMesh failed ...
    Connection refused"), in about 1 restart of 3 on a busy machine, again at each further restart
    (pytorch/pytorch#135712).  `TORCHELASTIC_RESTART_COUNT` cannot name the round: it is counted by each
    node's agent and differs between nodes (pytorch/pytorch#108158).  So rank 0 draws a fresh token and
    the others learn it through keys that cannot be stale (`_agree_on_round`)."""
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not dist.is_available() or dist.is_initialized():
        return False
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world < 2:
        return False
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    token = _agree_on_round(store, rank, world, timeout_s)
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"{ROUND_PREFIX}/{token}", store), rank=rank,
                            world_size=world, timeout=timeout)
    return True


def _agree_on_round(store, rank: int, world: int, timeout_s: float) -> str:
    """One token for every process of this round, from a store that still holds earlier rounds' keys.

    Rank 0 draws the token; every other rank writes a fresh nonce to `hello/<rank>` and waits for
    `welcome/<its nonce>` (a key no earlier round can have written), then confirms under the token
    (`<token>/ready/<rank>`, also new).  Rank 0 answers whatever nonce it finds in `hello/<rank>` (an old
    one gets an answer nobody reads) until every rank has confirmed.  The launcher has stopped every
    worker of the previous round before it starts this one, so nothing else writes these keys meanwhile.
    A rank that never arrives ends the others after `timeout_s` with StartupError (the launcher then
    restarts the round)."""
    deadline = time.monotonic() + timeout_s
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if rank == 0:
        token = f"{restart}-{uuid.uuid4().hex}"
        answered: set[bytes] = set()
        pending = set(range(1, world))
        while True:
            for r in sorted(pending):
                if store.check([f"{ROUND_PREFIX}/{token}/ready/{r}"]):
                    pending.discard(r)
                elif store.check([f"{ROUND_PREFIX}/hello/{r}"]):
                    nonce = store.get(f"{ROUND_PREFIX}/hello/{r}")
                    if nonce not in answered:
                        store.set(f"{ROUND_PREFIX}/welcome/{nonce.decode()}", token)
                        answered.add(nonce)
            if not pending:
                return token
            if time.monotonic() > deadline:
                raise StartupError(f"process-group start-up (launcher restart {restart}): rank(s) "
                                   f"{', '.join(map(str, sorted(pending)))} of {world} did not arrive within "
                                   f"{timeout_s:g} s (train.process_group_timeout_s)")
            time.sleep(_POLL_S)
    nonce = uuid.uuid4().hex
    store.set(f"{ROUND_PREFIX}/hello/{rank}", nonce)
    key = f"{ROUND_PREFIX}/welcome/{nonce}"
    while not store.check([key]):
        if time.monotonic() > deadline:
            raise StartupError(f"process-group start-up (launcher restart {restart}): rank 0 did not answer rank "
                               f"{rank} within {timeout_s:g} s (train.process_group_timeout_s)")
        time.sleep(_POLL_S)
    token = store.get(key).decode()
    store.set(f"{ROUND_PREFIX}/{token}/ready/{rank}", "1")
    return token


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


# ---------------------------------------------------------------------------------- rank 0 working alone
def _store():
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def publish(key: str, value: str) -> None:
    """Rank 0 says the others may go on (`value` tells them how it went); see `await_rank0`."""
    _store().set(f"wsra/solo/{key}", value)


def await_rank0(key: str, where: str, step: int = 0, poll_s: float = 0.2, stall_beats: int = 20) -> str:
    """The other ranks wait here while rank 0 works alone for longer than a collective may wait (e.g. writing a
    split's pseudo-labels): polling the store, not in a collective, so train.process_group_timeout_s does not
    apply; a rank 0 whose heartbeat stops for `stall_beats` beats ends this process with the lost-peer line."""
    store, watch = _store(), _WATCH
    full = f"wsra/solo/{key}"
    last, still = None, 0.0
    at(where, step)
    while True:
        if store.check([full]):
            return store.get(full).decode()
        time.sleep(poll_s)
        if watch is None:
            continue
        try:
            beat = int(store.add("wsra/hb/0", 0))
        except Exception:  # noqa: BLE001 - the store lives with rank 0
            watch._give_up(f"the rendezvous store stopped answering while waiting for rank 0 ({where})")
            return ""
        still = still + poll_s if beat == last else 0.0
        last = beat
        if still > stall_beats * HEARTBEAT_S:
            watch._give_up(f"rank 0's heartbeat stopped while it was {where}")
            return ""

"""SIGTERM / SIGINT end a training run cleanly: finish the step, checkpoint, say how to resume, exit non-zero.

Schedulers (Slurm, Kubernetes) send SIGTERM some time before SIGKILL; Ctrl-C sends SIGINT.  The handler only
records the signal; the trainer checks it after every step (all processes agree on the step through a
max-all-reduce of the flag when there are several) and stops there.  A second signal gets the default
behaviour back, so a user can still force the process down.

A step cannot finish while its data does not come: a remote shard that stalls (a `pipe:` command or URL that
sends nothing) would hold the stop until `data.read_timeout_s`.  So the readers mark their blocking waits for
shard data (`data_wait`); a signal that arrives during such a wait, or before one, arms a timer, and when the
wait still has not returned `STALL_S` later the timer's handler raises `StopDuringRead` into it.  The trainer then
writes a checkpoint at the last completed step where it can (one process, between steps) and exits 128 + signal.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

EXIT_BASE = 128  # shell convention: 128 + signal number (143 for SIGTERM, 130 for SIGINT)


STALL_S = 1.0  # a wait for shard data still blocked this long after the signal is a stalled one: stop without it


class Stopped(Exception):
    """Raised by the trainer after the stop checkpoint is written (`note`: what else the user should know)."""

    def __init__(self, signum: int, step: int, note: str = "", resume: str = "resume with resume=latest"):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}{note}; {resume}")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return EXIT_BASE + self.signum


class StopDuringRead(BaseException):
    """Raised into a wait for shard data that outlasted a stop signal by STALL_S.  A BaseException, like
    KeyboardInterrupt: the readers turn `Exception`s into data errors, and this is not one."""

    def __init__(self, signum: int, what: str, stalled: bool = True):
        super().__init__(f"{signal.Signals(signum).name} while waiting for data from {what}")
        self.signum, self.what = signum, what
        self.stalled = stalled  # False: the source itself was ended by the signal (sent to the whole group)


_ACTIVE: "StopSignals | None" = None  # the trainer's handler, while installed (data_wait looks it up)


class StopSignals:
    """Install with `with StopSignals() as stop:`; `stop.signum` is 0 until a signal arrived."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict = {}
        self._old_alarm = None
        self._waits: list[str] = []  # what the main thread is waiting for (nested data_wait regions)
        self._armed = False
        self.pid = os.getpid()  # forked loader workers inherit this object; only the trainer acts on it

    def _handle(self, signum, _frame) -> None:
        self.signum = signum
        for s, h in self._old.items():  # the next signal acts as it did before (force-quit stays possible)
            signal.signal(s, h)
        if self._waits and os.getpid() == self.pid:
            self._arm()

    def _arm(self) -> None:
        if not self._armed and self._old_alarm is not None:
            self._armed = True
            signal.setitimer(signal.ITIMER_REAL, STALL_S)

    def _alarm(self, _signum, _frame) -> None:
        self._armed = False
        if self._waits and self.signum and os.getpid() == self.pid:
            raise StopDuringRead(self.signum, self._waits[-1])

    def __enter__(self) -> "StopSignals":
        global _ACTIVE
        try:
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
            self._old_alarm = signal.signal(signal.SIGALRM, self._alarm)
        except ValueError:  # not the main thread (e.g. a notebook's worker thread): no graceful stop there
            self._old, self._old_alarm = {}, None
            return self
        _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        if self._old_alarm is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old_alarm)
            self._old_alarm = None
        if _ACTIVE is self:
            _ACTIVE = None


def pending() -> int:
    """The stop signal this process (the trainer) has received and not acted on yet; 0: none (or not the trainer).
    A shard source that fails right after a signal sent to the whole process group (Slurm signals every process
    of a job step) failed because of the stop, not because of its data."""
    st = _ACTIVE
    return st.signum if st is not None and os.getpid() == st.pid else 0


@contextmanager
def data_wait(what: str) -> Iterator[None]:
    """Marks a blocking wait for shard data in the trainer's main thread (`what`: the URL or source waited on):
    a stop signal during it, or already pending, ends it with StopDuringRead once STALL_S has passed without
    it returning.  A no-op elsewhere (no trainer, another thread, a forked loader worker)."""
    st = _ACTIVE
    if st is None or st._old_alarm is None or os.getpid() != st.pid or (
            threading.current_thread() is not threading.main_thread()):
        yield
        return
    st._waits.append(what)
    try:
        if st.signum:  # the signal came before this wait (between steps): the grace starts now
            st._arm()
        yield
    finally:
        st._waits.pop()
        if not st._waits and st._armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            st._armed = False

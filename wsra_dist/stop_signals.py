"""SIGTERM / SIGINT end a training run cleanly: finish the step, checkpoint, say how to resume, exit non-zero.

Schedulers (Slurm, Kubernetes) send SIGTERM some time before SIGKILL; Ctrl-C sends SIGINT.  The handler only
records the signal; the trainer checks it after every step (all processes agree on the step through a
max-all-reduce of the flag when there are several) and stops there.  A second signal gets the default
behaviour back, so a user can still force the process down.
"""

from __future__ import annotations

import signal

EXIT_BASE = 128  # shell convention: 128 + signal number (143 for SIGTERM, 130 for SIGINT)


class Stopped(Exception):
    """Raised by the trainer after the stop checkpoint is written."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; resume with resume=latest")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return EXIT_BASE + self.signum


class StopSignals:
    """Install with `with StopSignals() as stop:`; `stop.signum` is 0 until a signal arrived."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict = {}

    def _handle(self, signum, _frame) -> None:
        self.signum = signum
        for s, h in self._old.items():  # the next signal acts as it did before (force-quit stays possible)
            signal.signal(s, h)

    def __enter__(self) -> "StopSignals":
        try:
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook's worker thread): no graceful stop there
            self._old = {}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

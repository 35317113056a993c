"""Remote shards (`pipe:CMD`, http(s):// URLs) read with a timeout, through a guard that owns the command's processes.

webdataset's `gopen` runs `sh -c CMD` (curl for URLs) and reads it with a blocking read: a server that stops
sending hangs the reader forever, a failure surfaces as the raw Popen tuple, and the shell's children outlive
a killed reader.  Here:

* the command runs under a small guard process (`GUARD`, plain Python, no project import) that starts it in a
  session (process group) of its own and kills that whole group when it is told to stop (SIGTERM) or when the
  process that started it dies (Linux PR_SET_PDEATHSIG on the guard): no `sh`/`curl` survives the reader, a
  SIGTERM of the trainer, a SIGKILL of it, or a failure.  The guard ignores SIGINT: Ctrl-C reaches the whole
  foreground group, and the trainer, which stops cleanly on it, ends the command itself;
* the reader waits at most `timeout_s` (`data.read_timeout_s`) for each next byte; a stall fails with one line
  naming the URL;
* a command that exits non-zero fails with one line naming the URL, the command's exit status and, for curl,
  what the status means, plus the last line the command wrote on stderr.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import io
import os
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import weakref

from ..stop_signals import StopDuringRead, data_wait, pending
from .records import DataError

DEFAULT_TIMEOUT_S = 120.0
GUARD = r"""
import os, signal, subprocess, sys
child = subprocess.Popen(sys.argv[1], shell=True, start_new_session=True)
def stop(signum, frame):
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os._exit(128 + signum)
for s in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, stop)
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the reader's: it stops the command when it stops
rc = child.wait()
try:
    os.killpg(child.pid, signal.SIGKILL)  # what the command left running in its group
except ProcessLookupError:
    pass
sys.exit(rc if rc >= 0 else 128 - rc)
"""
CURL_STATUS = {6: "could not resolve the host", 7: "could not connect to the server", 18: "the transfer ended early",
               22: "the server answered with an HTTP error (404, 403, 500, ...)", 28: "curl's own timeout",
               35: "the TLS handshake failed", 52: "the server sent an empty reply",
               56: "the connection broke while receiving"}
_LIVE: "weakref.WeakSet[PipeStream]" = weakref.WeakSet()


def command_for(url: str) -> str | None:
    """The shell command that streams `url` (None: not a pipe or http(s) URL)."""
    if url.startswith("pipe:"):
        return url[len("pipe:"):]
    if url.startswith(("http://", "https://")):
        return f"curl -sSfL --connect-timeout 30 {shlex.quote(url)}"
    return None


def _guard_dies_with_us() -> None:  # preexec_fn: runs in the guard between fork and exec
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class PipeStream(io.RawIOBase):
    """The command's stdout as a readable binary stream with a per-read timeout."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        cmd = command_for(url)
        if cmd is None:
            raise ValueError(f"{url}: not a pipe: or http(s) URL")
        self.url, self.cmd, self.timeout_s = url, cmd, float(timeout_s)
        self.err = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command cannot block on stderr
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", GUARD, cmd], stdout=subprocess.PIPE,
                                     stderr=self.err, stdin=subprocess.DEVNULL, bufsize=0,
                                     preexec_fn=_guard_dies_with_us)
        self.fd = self.proc.stdout.fileno()
        self.done = False
        _LIVE.add(self)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.done:
            return 0
        with data_wait(self.url):  # a SIGTERM/SIGINT of the trainer ends a stalled wait (stop_signals.py)
            ready, _, _ = select.select([self.fd], [], [], self.timeout_s)
        if not ready:
            self.close()
            raise DataError(f"{self.url}: no data for {self.timeout_s:g} s (data.read_timeout_s): the shard source "
                            "stalled; its command was stopped")
        data = os.read(self.fd, len(b))
        if not data:
            self._finish()
            return 0
        b[: len(data)] = data
        return len(data)

    def _finish(self) -> None:
        self.done = True
        try:
            rc = self.proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.close()
            raise DataError(f"{self.url}: the command closed its output but did not exit within "
                            f"{self.timeout_s:g} s (data.read_timeout_s); it was stopped") from None
        if rc != 0:
            if pending():  # the stop signal reached the command too (sent to the whole group): not a data error
                raise StopDuringRead(pending(), self.url, stalled=False)
            raise DataError(f"{self.url}: {self._describe(rc)}")

    def _describe(self, rc: int) -> str:
        prog = shlex.split(self.cmd)[0] if self.cmd.strip() else "?"
        what = f"`{self.cmd if len(self.cmd) < 120 else self.cmd[:117] + '...'}` exited with status {rc}"
        if os.path.basename(prog) == "curl" and rc in CURL_STATUS:
            what += f" (curl: {CURL_STATUS[rc]})"
        elif rc > 128:
            what += f" (killed by {signal.Signals(rc - 128).name})" if rc - 128 in signal.valid_signals() else ""
        self.err.seek(0)
        tail = [ln for ln in self.err.read()[-2000:].decode("utf-8", "replace").splitlines() if ln.strip()]
        return what + (f": {tail[-1].strip()}" if tail else "")

    def close(self) -> None:
        if self.closed:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # the guard kills the command's whole group
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.err.close()
        _LIVE.discard(self)
        super().close()


def open_remote(url: str, timeout_s: float = DEFAULT_TIMEOUT_S):
    """A buffered reader of a remote shard: PipeStream for pipe:/http(s), webdataset's gopen for other schemes."""
    if command_for(url) is not None:
        return io.BufferedReader(PipeStream(url, timeout_s), 1 << 20)
    import webdataset as wds

    return wds.gopen(url, "rb")


@atexit.register
def _close_all() -> None:
    for s in list(_LIVE):
        try:
            s.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass

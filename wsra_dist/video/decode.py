"""PyAV decoding: a video's duration and its frames at their presentation timestamps.

Time of a frame: (pts - stream start_time) x time_base, in seconds, so the first frame of a stream that
starts at 0 (mp4, mkv, webm) is at its pts and a stream with an offset (MPEG-TS starts at ~1.4 s) still
starts at 0 as a player shows it.  `frames(prefetch=N)` can decode ahead in a helper thread (libavcodec
releases the GIL); the extractors leave it off: on 2 cores handing frames across threads cost more than
the overlap won (docs/benchmarks.md).

Duration, used for the snippet grid (T = ceil(duration x fps)): the video stream's own duration when the
container records it, else the container's duration, else the end of the last packet (demuxed, not
decoded).  The stream comes first because a container's duration also spans audio, which often outlasts
the picture by a fraction of a second.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


class VideoError(Exception):
    """A video that cannot be used; the message is the reason (callers add the path)."""


@dataclass(frozen=True)
class VideoInfo:
    duration: float  # seconds (see the module docstring for which value)
    duration_source: str  # "stream", "container" or "packets"
    width: int
    height: int
    pix_fmt: str
    codec: str
    rate: float | None  # average frame rate, when the container gives one


def reason(e: BaseException) -> str:
    """A short reason from a PyAV/FFmpeg error (its strerror and not the repr noise)."""
    msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
    log = getattr(e, "log", None)  # FFmpeg's own last log line, when PyAV kept one
    if log and isinstance(log, tuple) and len(log) >= 3 and log[2]:
        msg = f"{msg} ({str(log[2]).strip()})"
    return msg


def _end_of_packets(path: str, index: int, start: int) -> float | None:
    import av

    try:
        with av.open(path) as c:
            s = c.streams.video[index]
            end = None
            for p in c.demux(s):
                if p.pts is not None:
                    e = p.pts + (p.duration or 0)
                    end = e if end is None else max(end, e)
            return None if end is None else float((end - start) * s.time_base)
    except Exception:  # noqa: BLE001 - only a fallback: the caller reports "no duration"
        return None


class Video:
    """An open video file: `info`, then `frames()` (once).  Use as a context manager."""

    def __init__(self, path: str | Path):
        import av

        self.path = str(path)
        if not Path(self.path).is_file():
            raise VideoError("no such file")
        try:
            self.container = av.open(self.path)
        except Exception as e:  # noqa: BLE001 - any open failure is a reason, not a crash
            raise VideoError(f"cannot open: {reason(e)}") from None
        try:
            if not self.container.streams.video:
                raise VideoError("no video stream")
            self.stream = self.container.streams.video[0]
            tb = self.stream.time_base
            if tb is None or tb <= 0:
                raise VideoError("the video stream has no time base")
            self.time_base = tb
            self.start_pts = self.stream.start_time or 0
            self.info = self._info()
        except BaseException:
            self.container.close()
            raise

    def _info(self) -> VideoInfo:
        import av

        s, c = self.stream, self.container
        if s.duration is not None and s.duration > 0:
            dur, src = float(s.duration * s.time_base), "stream"
        elif c.duration is not None and c.duration > 0:
            dur, src = float(c.duration / av.time_base), "container"
        else:
            dur, src = _end_of_packets(self.path, s.index, self.start_pts), "packets"
        if dur is None or not dur > 0:
            raise VideoError("no duration (no stream or container duration and no timestamped packet)")
        cc = s.codec_context
        rate = float(s.average_rate) if s.average_rate else None
        return VideoInfo(duration=dur, duration_source=src, width=int(cc.width), height=int(cc.height),
                         pix_fmt=str(cc.pix_fmt), codec=str(cc.name), rate=rate)

    def _decode(self) -> Iterator[tuple[float, object]]:
        """(seconds, av.VideoFrame) in decoding output order (presentation order)."""
        step = 1.0 / self.info.rate if self.info.rate else 0.0
        tb, start = float(self.time_base), self.start_pts  # float: Fraction arithmetic costs microseconds a frame
        t_prev, n = None, 0
        try:
            for frame in self.container.decode(self.stream):
                pts = frame.pts
                if pts is not None:
                    t = (pts - start) * tb
                else:  # no timestamp (rare raw streams): one frame interval after the previous frame
                    t = 0.0 if t_prev is None else t_prev + step
                t_prev, n = t, n + 1
                yield t, frame
        except Exception as e:  # noqa: BLE001 - a decoding error mid-stream is this video's failure
            at = f" after {n} frames ({t_prev:.2f} s)" if n else ""
            raise VideoError(f"decoding failed{at}: {reason(e)}") from None

    def frames(self, prefetch: int = 16) -> Iterator[tuple[float, object]]:
        """Frames decoded ahead in a helper thread (`prefetch` frames at most); 0 decodes in this thread."""
        if prefetch <= 0:
            yield from self._decode()
            return
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                for item in self._decode():
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                q.put(e)

        th = threading.Thread(target=produce, name="wsra-decode", daemon=True)
        th.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while th.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    th.join(0.05)

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> "Video":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

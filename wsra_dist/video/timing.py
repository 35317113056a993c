"""Which frames make which snippet (or DiDeMo chunk): the time rules, in one place, with no decoder.

* Bins.  Snippet k covers [k/F, (k+1)/F) seconds, k = 0 .. T-1, T = ceil(duration x F) (the `charades` and
  `activitynet` layouts).  DiDeMo chunk c covers [5c, 5c+5), c = 0 .. 5; a chunk that starts at or after the
  end of the video is a row of zeros, as in the official files, and frames after 30 s are not used.
* All frames (default).  A bin's feature is the mean of the features of the frames whose timestamps fall
  in it.  A frame stamped before 0 or after the last bin counts in no bin.
* K frames per snippet (`--frames-per-snippet K`).  Snippet k's K sample times are (k + (j + 0.5)/K)/F,
  j = 0 .. K-1 (evenly spaced, centred); each takes the decoded frame nearest to it (ties: the earlier
  frame), so a snippet is the mean of exactly K frame features (a frame may serve several sample times when
  the video has fewer than K x F frames per second; it is then counted once per sample time).  Only
  selected frames go through the model.  DiDeMo chunks take the sample times that fall in them.
* Empty bins.  A bin that no frame (or sample) falls in - the snippet rate is above the video's frame
  rate, or the stream has a gap or ends before its declared duration - takes the feature of the frame
  nearest to its centre (ties: the earlier frame), so a grounding never sees an artificial zero inside
  the video.  How many bins were filled this way is recorded per video in the features manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

DIDEMO_CHUNK_S = 5.0
DIDEMO_CHUNKS = 6


def snippet_count(duration: float, fps: float) -> int:
    """T = ceil(duration x fps), at least 1 (a relative 1e-9 absorbs float noise: 10 s x 3 fps is 30, not 31)."""
    x = duration * fps
    return max(1, int(math.ceil(x - 1e-9 * max(1.0, x))))


@dataclass(frozen=True)
class Grid:
    """`count` bins of `width` seconds from 0; bins starting at or after `valid_until` are zero rows."""

    width: float
    count: int
    valid_until: float = math.inf

    @classmethod
    def for_layout(cls, layout: str, duration: float, fps: float) -> "Grid":
        if layout == "didemo":
            return cls(DIDEMO_CHUNK_S, DIDEMO_CHUNKS, duration)
        return cls(1.0 / fps, snippet_count(duration, fps))

    def bins(self, times: np.ndarray) -> np.ndarray:
        """Bin index of each time, -1 outside [0, count x width)."""
        times = np.asarray(times, dtype=np.float64)
        k = np.floor(times / self.width).astype(np.int64)
        k[(times < 0) | (k >= self.count)] = -1
        return k

    def live(self) -> np.ndarray:
        """Bins that start before the end (the others are zero rows)."""
        return np.arange(self.count) * self.width < self.valid_until

    def centres(self) -> np.ndarray:
        start = np.arange(self.count) * self.width
        end = np.minimum(start + self.width, max(self.valid_until, 0.0))
        return np.where(end > start, (start + end) / 2, start + self.width / 2)


def sample_times(duration: float, fps: float, k: int) -> np.ndarray:
    """The K evenly spaced, centred sample times of each of the T snippets, in order (T x K,)."""
    T = snippet_count(duration, fps)
    j = (np.arange(k) + 0.5) / k
    return ((np.arange(T)[:, None] + j[None, :]) / fps).reshape(-1)


class NearestSelector:
    """Streams frames in time order and hands out each one with the sample times it is nearest to.

    A frame is emitted once the next frame shows which sample times it wins, so only a one-frame lookahead
    is held.  A frame stamped at or before the previous one (a broken stream) is skipped and counted.
    """

    def __init__(self, targets: np.ndarray):
        self.targets = np.asarray(targets, dtype=np.float64)
        self.j = 0  # first unassigned target
        self.pending: tuple[float, Any, list[float]] | None = None
        self.skipped = 0

    def push(self, t: float, item: Any) -> Iterator[tuple[float, Any, list[float]]]:
        tg = self.targets
        if self.pending is None:
            mine: list[float] = []
            while self.j < len(tg) and tg[self.j] <= t:  # targets before the first frame: the first frame
                mine.append(float(tg[self.j]))
                self.j += 1
            self.pending = (t, item, mine)
            return
        tp, ip, mp = self.pending
        if t <= tp:
            self.skipped += 1
            return
        mine = []
        while self.j < len(tg) and tg[self.j] <= t:
            x = float(tg[self.j])
            (mp if x - tp <= t - x else mine).append(x)  # ties go to the earlier frame
            self.j += 1
        if mp:
            yield tp, ip, mp
        self.pending = (t, item, mine)

    def finish(self) -> Iterator[tuple[float, Any, list[float]]]:
        if self.pending is None:
            return
        tp, ip, mp = self.pending
        mp = mp + [float(x) for x in self.targets[self.j:]]  # targets after the last frame: the last frame
        self.j = len(self.targets)
        self.pending = None
        if mp:
            yield tp, ip, mp


class BinPooler:
    """Sums of frame features per bin (counting each frame once per time it stands for) and, for the
    empty-bin rule, the frame nearest to each bin's centre.  Fed in batches, in any order."""

    def __init__(self, grid: Grid, dim: int):
        self.grid = grid
        self.sums = np.zeros((grid.count, dim), dtype=np.float64)
        self.counts = np.zeros(grid.count, dtype=np.int64)
        self.centres = grid.centres()
        self.best = np.full(grid.count, np.inf)
        self.nearest = np.zeros((grid.count, dim), dtype=np.float64)
        self.frames = 0

    def add(self, feats: np.ndarray, frame_times: np.ndarray, stands_for: list[list[float]] | None = None) -> None:
        """feats (B, D) of frames at `frame_times` (B,); `stands_for[i]`: the sample times frame i was chosen
        for (K mode), else (None) each frame stands for its own time."""
        feats = np.asarray(feats, dtype=np.float64)
        frame_times = np.asarray(frame_times, dtype=np.float64)
        if len(feats) == 0:
            return
        self.frames += len(feats)
        if stands_for is None:
            rows, times = np.arange(len(feats)), frame_times
        else:
            rows = np.repeat(np.arange(len(feats)), [len(s) for s in stands_for])
            times = np.asarray([x for s in stands_for for x in s], dtype=np.float64)
        b = self.grid.bins(times)
        ok = b >= 0
        np.add.at(self.sums, b[ok], feats[rows[ok]])
        self.counts += np.bincount(b[ok], minlength=self.grid.count)
        # nearest frame to each bin centre: first minimum within the batch, strictly better across batches,
        # so ties keep the earlier frame when frames arrive in time order
        d = np.abs(frame_times[:, None] - self.centres[None, :])  # (B, count)
        i = d.argmin(0)
        di = d[i, np.arange(self.grid.count)]
        better = di < self.best
        self.best[better] = di[better]
        self.nearest[better] = feats[i[better]]

    def result(self) -> tuple[np.ndarray, int]:
        """((count, D) float32, number of live bins filled with their nearest frame)."""
        out = np.zeros_like(self.sums)
        has = self.counts > 0
        out[has] = self.sums[has] / self.counts[has, None]
        live = self.grid.live()
        empty = live & ~has & np.isfinite(self.best)
        out[empty] = self.nearest[empty]
        out[~live] = 0.0
        return out.astype(np.float32), int(empty.sum())

"""Plain records read from the official files (format knowledge stays in didemo.py / charades.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """Bad input, with the file and the line or record that caused it."""


@dataclass
class QueryRecord:
    query_id: int  # DiDeMo annotation_id; Charades-STA 0-based line number of the annotation file
    video: str  # the real id (DiDeMo names contain dots; never used as a WebDataset key)
    sentence: str
    # DiDeMo: inclusive chunk pairs, one per annotator.  Charades-STA: one [start, end] in seconds.
    times: list[list[float]]
    duration: float = 0.0  # seconds (Charades-STA); DiDeMo: 5 x num_segments
    num_segments: int = 0
    extra: dict = field(default_factory=dict)

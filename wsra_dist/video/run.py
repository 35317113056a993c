"""`wsra-dist features`: many videos, one or many processes, resumable, with the features manifest.

Processes.  Under `accelerate launch` / torchrun (WORLD_SIZE > 1) process r takes videos r::world of the
input list (in list order: a folder is read in name order) and writes its own files (npy per video, or
HDF5 parts); a gloo process group is used only to agree at the start (rank 0 checks --out first) and to
wait for every process at the end, after which rank 0 assembles the HDF5 and writes the manifest.  Only
counts and messages cross processes, never features, so the output equals a one-process run's
(tests/test_features.py).  Several
nodes need --out on a file system they all see.  The end barrier waits up to 24 h for the slowest process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data.records import DataError
from ..data.shards import sha256_file
from .decode import VideoError
from .extract import extractor_record, load_extractor
from .layouts import Output, output_for
from .pipeline import Spec, extract_video

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp",
                    ".ts", ".mts", ".ogv")
BARRIER_TIMEOUT_S = 24 * 3600


def list_videos(videos: str | Path) -> list[Path]:
    """A folder (its video files, by name; not recursive) or a text file with one path per line (relative
    paths are relative to the list file's folder; blank lines and lines starting with '#' are skipped).
    A listed file that does not exist is not an error here: it is reported as a failed video."""
    src = Path(videos)
    if src.is_dir():
        out = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
        if not out:
            raise DataError(f"--videos {src}: no video files ({', '.join(VIDEO_EXTENSIONS)}) in the folder")
        return out
    if not src.is_file():
        raise DataError(f"--videos {src}: no such folder or list file")
    try:
        lines = src.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--videos {src}: cannot read the list: {e}") from None
    out = []
    for line in lines:
        s = line.strip()
        if s and not s.startswith("#"):
            p = Path(s).expanduser()
            out.append(p if p.is_absolute() else src.parent / p)
    if not out:
        raise DataError(f"--videos {src}: the list names no video")
    return out


@dataclass
class Summary:
    out: Path
    manifest: Path
    written: int = 0
    skipped: int = 0
    failed: int = 0
    frames: int = 0
    failures: dict = field(default_factory=dict)  # key -> {"path", "reason"} (all processes)
    warnings: list = field(default_factory=list)


class _Group:
    """The process group of `accelerate launch` (gloo: CPU or GPU alike), or a single process."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.dist = None
        if self.world > 1:
            from datetime import timedelta

            import torch.distributed as dist

            from ..lifetime import die_with_parent, launched_worker

            if launched_worker():
                die_with_parent()
            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=timedelta(seconds=BARRIER_TIMEOUT_S))
            self.dist = dist

    def first_then_all(self, fn) -> None:
        """Run `fn` on rank 0, then (if it succeeded) on the others; a failure on rank 0 is raised everywhere."""
        if self.dist is None:
            fn()
            return
        err = [None]
        if self.rank == 0:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - every process stops with rank 0's reason
                from ..errors import describe

                err = [describe(e)]
        self.dist.broadcast_object_list(err, src=0)
        if err[0] is not None:
            raise DataError(err[0])
        if self.rank != 0:
            fn()

    def gather(self, obj):
        if self.dist is None:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if self.dist is None:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.dist is not None and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _source(path: Path) -> dict:
    st = path.stat()
    return {"path": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


def _unchanged(rec: dict, path: Path) -> bool:
    src = rec.get("source") or {}
    try:
        st = path.stat()
    except OSError:
        return True  # the video is gone but its features are there: nothing to redo
    return src.get("size") == st.st_size and src.get("mtime_ns") == st.st_mtime_ns


def _bar(desc: str, enabled: bool, console):
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # on stderr with the failure lines: stdout carries only the summary line scripts read
    return Progress(TextColumn(escape(desc)), BarColumn(), MofNCompleteColumn(),
                    TextColumn("videos", markup=False),
                    TextColumn("{task.fields[rates]}", markup=False), TimeElapsedColumn(),
                    disable=not enabled, transient=False, console=console)


def _say(console, label: str, text: str, style: str) -> None:
    from rich.text import Text

    line = Text(f"{label}: ", style=style)
    line.append(text.replace("\n", " "))  # plain text (never markup), one line
    console.print(line, soft_wrap=True)


def run_features(videos: str | Path, model: str, fps: float, layout: str, out: str | Path, batch_size: int = 32,
                 device: str | None = None, frames_per_snippet: int = 0, progress: bool = True,
                 prefetch: int | None = None) -> Summary:
    """Extract every listed video's features into `out` in `layout`; see the module docstring."""
    from rich.console import Console

    spec = Spec(layout, float(fps), int(frames_per_snippet), int(batch_size))
    paths = list_videos(videos)
    output: Output = output_for(layout, out)
    keys: dict[str, Path] = {}
    for p in paths:
        k = output.key(p)
        if k in keys:
            raise DataError(f"--videos {videos}: two videos give the key {k!r} ({keys[k]} and {p}); the {layout} "
                            "layout names videos by their file " + ("name" if layout == "didemo" else "stem"))
        keys[k] = p
    group = _Group()
    try:
        extractor = load_extractor(model, device)
        record = extractor_record(extractor, spec.fps, spec.frames_per_snippet, layout)
        group.first_then_all(lambda: output.prepare(record))
        done = output.records()
        summary = Summary(Path(out), output.manifest)
        todo = []
        for i, (k, p) in enumerate(keys.items()):
            if i % group.world != group.rank:
                continue
            if k in done and output.has(k) and _unchanged(done[k], p):
                summary.skipped += 1
            else:
                todo.append((k, p))
        console = Console(stderr=True, soft_wrap=True, highlight=False)
        show = progress and group.rank == 0
        where = f"extracting {model if model == 'pixels' else Path(model).name} features -> {out}"
        if group.world > 1:
            where += f" (process 0 of {group.world})"
        t0 = time.perf_counter()
        with _bar(where, show, console) as bar:
            task = bar.add_task("", total=len(todo), rates="")
            say = bar.console

            def rates() -> str:
                dt = max(time.perf_counter() - t0, 1e-9)
                return f"{summary.written / dt:.2f} videos/s  {summary.frames / dt:.0f} frames/s"

            def frames_done(n: int) -> None:
                summary.frames += n
                bar.update(task, rates=rates())

            for k, p in todo:
                try:
                    src = _source(p) if p.is_file() else None
                    x, rec = extract_video(p, extractor, spec, prefetch, frames_done)
                except VideoError as e:
                    summary.failed += 1
                    _say(say, "failed", f"{p}: {e}", "bold red")
                    output.journal(group.rank, {"key": k, "ok": False, "path": p.name, "reason": str(e)})
                    bar.advance(task)
                    continue
                output.write(k, x)
                output.journal(group.rank, {"key": k, "ok": True, "record": {**rec, "source": src}})
                if rec.get("warning"):
                    summary.warnings.append(f"{p}: {rec['warning']}")
                    _say(say, "warning", f"{p}: {rec['warning']}", "bold yellow")
                summary.written += 1
                bar.update(task, advance=1, rates=rates())
        # a collective: after it every process's files and journal lines are complete
        counts = group.gather((summary.written, summary.skipped, summary.failed, summary.frames))
        summary.written, summary.skipped, summary.failed, summary.frames = (sum(c[i] for c in counts) for i in range(4))
        result: tuple = ("ok", None)
        if group.rank == 0:
            try:
                result = ("ok", output.finalize(record, output.journal_failures())["failures"])
            except Exception as e:  # noqa: BLE001 - told to the other processes, then raised here
                if group.dist is None:
                    raise
                group.broadcast(("error", str(e)))
                raise
        result = group.broadcast(result)
        if result[0] == "error":
            raise DataError(f"assembling {out} failed on process 0: {result[1]}")
        summary.failures = result[1] or {}
        return summary
    finally:
        group.close()

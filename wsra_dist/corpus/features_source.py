"""`wsra-dist index --features FILE_OR_DIR`: the videos of a features file or folder, as a Corpus.

The same files `ground --features` reads, one video each: a folder of VIDEO.npy ((T, D) snippets, Charades-STA's
I3D release or `wsra-dist features` output), or an HDF5 with one dataset per video (DiDeMo's (6, D) chunk files)
or one group per video holding a single dataset (ActivityNet's v_ID/c3d_features).  The time axis of snippet
features comes from the features manifest `wsra-dist features` wrote, or from --fps, exactly as for `ground`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..data.records import DataError
from .candidates import Corpus, CorpusBuilder, video_candidates


def feature_videos(spec: str) -> list[tuple[str, str]]:
    """(video name, `ground`-style spec: VIDEO.npy or FILE.h5:KEY) of every video in a features file or folder."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(p.glob("*.npy"))
        if not files:
            raise DataError(f"{p}: a features folder holds VIDEO.npy files, and this one has none")
        return [(f.stem, str(f)) for f in files]
    if not p.exists():
        raise DataError(f"--features {p}: no such file or folder")
    if p.suffix.lower() not in (".h5", ".hdf5"):
        raise DataError(f"--features {p}: give a folder of VIDEO.npy or an HDF5 file (.h5/.hdf5)")
    import h5py

    out: list[tuple[str, str]] = []
    try:
        with h5py.File(p, "r") as f:
            for name in f.keys():
                node = _follow(f, name, p)
                if isinstance(node, h5py.Dataset):
                    out.append((name, f"{p}:{name}"))
                    continue
                inner = [k for k in node.keys() if isinstance(_follow(node, k, p, name), h5py.Dataset)]
                if len(inner) != 1:
                    raise DataError(f"{p}: group {name!r} holds {len(inner)} datasets; a video's group must hold one "
                                    "(e.g. ActivityNet's v_ID/c3d_features)")
                out.append((name, f"{p}:{name}/{inner[0]}"))
    except OSError as e:
        raise DataError(f"{p}: cannot read HDF5: {e}") from None
    if not out:
        raise DataError(f"{p}: holds no videos")
    return out


def didemo_length(chunks) -> float:
    """Seconds of a DiDeMo video from its (6, D) chunk features: the official files (and `synth`) pad a video
    shorter than 30 s with all-zero chunks at the end, as the annotations' num_segments says; so 5 s per chunk up
    to the last non-zero one (at least one), the same length the shards record from num_segments."""
    import numpy as np

    nonzero = np.flatnonzero(np.abs(np.asarray(chunks)).sum(1) > 0)
    return 5.0 * (int(nonzero[-1]) + 1 if len(nonzero) else 6)


def _follow(group, key: str, p: Path, parent: str | None = None):
    """group[key], or one line naming FILE:KEY when it is a dangling soft link or an external link to a file
    that is missing or unreadable (h5py raises KeyError/OSError from deep inside)."""
    where = f"{p}:{parent + '/' if parent else ''}{key}"
    try:
        node = group[key]
    except (KeyError, OSError, RuntimeError) as e:
        link = group.get(key, getlink=True)
        kind = {"SoftLink": "a soft link", "ExternalLink": "an external link"}.get(type(link).__name__, "an entry")
        target = getattr(link, "filename", None) or getattr(link, "path", None)
        raise DataError(f"{where}: {kind} that cannot be followed{f' (to {target})' if target else ''}: {e}") from None
    if node is None:
        raise DataError(f"{where}: an entry that cannot be read")
    return node


@torch.inference_mode()
def read_features_corpus(model, info: dict, spec: str, device, fps: float | None = None,
                         progress: Callable[[int, int], None] | None = None) -> Corpus:
    """Every video of `spec` projected by the checkpoint's φ (model, info from evaluation.predict.load_run)."""
    from ..ground import features_timing, read_features, snippet_length

    protocol = info.get("benchmark")
    if protocol not in ("didemo", "charades", "activitynet"):
        raise DataError(f"the checkpoint records benchmark {protocol!r}; an index needs didemo, charades or activitynet")
    want = int(info["dims"]["video"]) if protocol != "didemo" else None
    dims = tuple(model.didemo.modality_dims) if model.didemo is not None else None
    resample = (info.get("reader") or {}).get("resample")
    build = CorpusBuilder(model, protocol)
    videos = feature_videos(spec)
    for i, (name, vspec) in enumerate(videos):
        x = read_features(vspec)
        timing = features_timing(vspec, info, x.shape[0], fps, ask="--fps SNIPPETS_PER_SECOND")
        if protocol == "didemo":
            if dims is None or x.shape != (6, sum(dims)):
                raise DataError(f"{vspec}: a DiDeMo checkpoint takes (6, {sum(dims or ())}) chunk features, got {x.shape}")
            length = timing.duration or didemo_length(x)
        else:
            if x.shape[1] != want:
                raise DataError(f"{vspec}: {x.shape[1]}-d features, but the checkpoint expects {want}-d")
            length = snippet_length(x.shape[0], timing.duration, timing.fps, ask="--fps SNIPPETS_PER_SECOND")
            if resample:
                from ..data.charades import resample as resample_rows

                x = resample_rows(x, int(resample))
        build.add(name, length, *video_candidates(model, x, length, protocol, device))
        if progress:
            progress(i + 1, len(videos))
    return build.corpus()

"""`wsra-dist index`: a collection's projected candidates on disk, built once, searched many times.

INDEX/ holds `index.json` (format, the model's identity: sha256 of its weights and its config, the protocol, the
features' provenance, the dtype, every video with its first candidate and count), `candidates.safetensors`
(pv (M, H) in fp16 or fp32, intervals in seconds and in IoU units, each candidate's video) and the model itself
(`model/`: save_pretrained, 10 MB), so searching needs the index and the text encoder only.  Written like shards:
into a staging folder, swapped in when complete; appending new videos writes a new index and swaps it in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..data.records import DataError
from .candidates import Corpus

INDEX_FORMAT = "wsra-dist-index/1"
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def weights_sha256(run_dir: str | Path) -> str:
    h = hashlib.sha256()
    with open(Path(run_dir) / "model.safetensors", "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class CorpusIndex:
    """A loaded index: the corpus, the model and the manifest."""

    def __init__(self, path: Path, manifest: dict, corpus: Corpus, model):
        self.path, self.manifest, self.corpus, self.model = Path(path), manifest, corpus, model

    @property
    def protocol(self) -> str:
        return self.manifest["protocol"]

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "CorpusIndex":
        from safetensors.torch import load_file

        from ..model import WSRA

        path = Path(path)
        mf = path / "index.json"
        try:
            manifest = json.loads(mf.read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: not an index (no index.json); build one with `wsra-dist index`") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{mf}: unreadable ({e})") from None
        if not isinstance(manifest, dict) or str(manifest.get("format", "")).split("/")[0] != INDEX_FORMAT.split("/")[0]:
            raise DataError(f"{mf}: not a wsra-dist index (format {manifest.get('format') if isinstance(manifest, dict) else '?'})")
        try:
            t = load_file(str(path / "candidates.safetensors"))
            model = WSRA.from_pretrained(path / "model", device)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: incomplete or damaged index ({e})") from None
        vids = manifest["videos"]
        corpus = Corpus([v["video"] for v in vids], [float(v["duration"]) for v in vids], t["pv"],
                        t["video_of"].numpy().astype(np.int64), t["starts"].numpy(), t["ends"].numpy(),
                        manifest["protocol"] == "didemo", t["iou_starts"].numpy(), t["iou_ends"].numpy())
        if corpus.pv.shape[0] != corpus.size or corpus.size != sum(v["count"] for v in vids):
            raise DataError(f"{path}: candidates.safetensors does not match index.json (damaged index)")
        return cls(path, manifest, corpus, model)


def check_same_model(manifest: dict, sha: str, where: str) -> None:
    if manifest["model"]["sha256"] != sha:
        raise DataError(f"{where}: the index was built with another model (weights sha256 "
                        f"{manifest['model']['sha256'][:12]}..., this checkpoint {sha[:12]}...); build a new index")


def merge(a: Corpus | None, b: Corpus) -> Corpus:
    if a is None:
        return b
    shared = set(a.videos) & set(b.videos)
    if shared:
        raise DataError(f"the index already holds video {sorted(shared)[0]!r} ({len(shared)} in all); "
                        "give only new videos to append")
    n = len(a.videos)
    return Corpus(a.videos + b.videos, a.durations + b.durations, torch.cat([a.pv.float(), b.pv.float()]),
                  np.concatenate([a.video_of, b.video_of + n]), np.concatenate([a.starts, b.starts]),
                  np.concatenate([a.ends, b.ends]), a.grid, np.concatenate([a.iou_starts, b.iou_starts]),
                  np.concatenate([a.iou_ends, b.iou_ends]))


def write_index(out: str | Path, corpus: Corpus, model, manifest: dict, dtype: str) -> Path:
    """Write the index to a staging folder and swap it in (an existing index is replaced only when complete)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not (out / "index.json").is_file():
        if not out.is_dir() or any(out.iterdir()):
            raise DataError(f"--out {out} exists and is not an index: give a new folder or an index to append to")
    stage = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        counts = np.bincount(corpus.video_of, minlength=len(corpus.videos))
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else np.zeros(0, int)
        manifest = {**manifest, "format": INDEX_FORMAT, "dtype": dtype, "candidates": corpus.size,
                    "hidden": int(corpus.pv.shape[1]) if corpus.size else 0,
                    "videos": [{"video": v, "duration": d, "first": int(f), "count": int(c)}
                               for v, d, f, c in zip(corpus.videos, corpus.durations, first, counts)]}
        save_file({"pv": corpus.pv.to(DTYPES[dtype]).contiguous(),
                   "video_of": torch.as_tensor(corpus.video_of, dtype=torch.int32),
                   **{k: torch.as_tensor(np.ascontiguousarray(getattr(corpus, k), dtype=np.float64))
                      for k in ("starts", "ends", "iou_starts", "iou_ends")}},
                  str(stage / "candidates.safetensors"))
        model.save_pretrained(stage / "model")
        (stage / "index.json").write_text(json.dumps(manifest, indent=1))
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def build_index(checkpoint: str | Path, sources: list[str], out: str | Path, dtype: str = "fp16",
                device: str | torch.device = "cpu", progress=None) -> Path:
    """Project every video of `sources` (shard folders) with the checkpoint's φ and write (or extend) the index."""
    from ..data.loader import ShardSource
    from ..evaluation.predict import check_compatible, load_run
    from .candidates import read_split

    if dtype not in DTYPES:
        raise DataError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model, info = load_run(checkpoint, device)
    sha = weights_sha256(checkpoint)
    out = Path(out)
    existing = CorpusIndex.load(out) if (out / "index.json").is_file() else None
    if existing is not None:
        check_same_model(existing.manifest, sha, str(out))
        if existing.manifest["dtype"] != dtype:
            raise DataError(f"{out}: the index is {existing.manifest['dtype']}; append with --dtype {existing.manifest['dtype']}")
    corpus = existing.corpus if existing else None
    feats = list(existing.manifest["features"]) if existing else []
    protocol = existing.protocol if existing else None
    for src in sources:
        source = ShardSource.open(src)
        check_compatible(info, source.manifest, src)
        p = source.manifest.get("benchmark")
        if protocol is not None and p != protocol:
            raise DataError(f"{src}: {p!r} shards cannot join a {protocol!r} index")
        protocol = p
        part, _ = read_split(model, source, p, torch.device(device))
        corpus = merge(corpus, part)
        feats.append({"source": str(src), "videos": len(part.videos), "extractor": source.manifest.get("extractor"),
                      "text": source.manifest.get("text", {}).get("model"),
                      "shards_sha256": hashlib.sha256("".join(source.shas).encode()).hexdigest()})
        if progress:
            progress(f"{src}: {len(part.videos)} videos, {part.size} candidates")
    manifest = {"protocol": protocol, "model": {"sha256": sha, "checkpoint": str(checkpoint),
                                                "recipe": info.get("recipe_name"), "text": info.get("text", {})},
                "features": feats}
    return write_index(out, corpus, model, manifest, dtype)

"""`wsra-dist index`: a collection's projected candidates on disk, built once, searched many times.

INDEX/ holds `index.json` (format, the model's identity: sha256 of its weights and its config, the protocol, the
features' provenance, the dtype, the candidate layout, the sha256 of the tensors file, every video with its first
candidate and count), `candidates.safetensors` and the model itself (`model/`: save_pretrained), so searching needs
the index and the text encoder only.  The tensors (store.py): DiDeMo's per-video parts ("didemo_chunks": the
global part and the 6 projected chunks per modality at --dtype, 21 denominators and norms in fp32; the 21 spans
are implied), or one projection per candidate with its interval and video ("candidates": Charades-STA and
ActivityNet windows, LayerNorm models).  Written like shards: into a staging folder, swapped in when complete;
appending new videos writes a new index and swaps it in.  Loading checks the sha256 and that every value is
finite, so a damaged file is refused instead of ranking NaN scores.
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
from ..data.shards import pid_alive
from .candidates import Corpus
from .store import cat_stores, store_from_tensors

INDEX_FORMAT = "wsra-dist-index/2"  # /1: dense candidates, no checksum (still read)
READ_VERSIONS = ("1", "2")
PROJECTION_KEYS = ("pv", "g", "local", "snippets")  # stored at the index dtype; the rest is fp32/int
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(run_dir: str | Path) -> str:
    return file_sha256(Path(run_dir) / "model.safetensors")


class CorpusIndex:
    """A loaded index: the corpus, the model and the manifest."""

    def __init__(self, path: Path, manifest: dict, corpus: Corpus, model):
        self.path, self.manifest, self.corpus, self.model = Path(path), manifest, corpus, model

    @property
    def protocol(self) -> str:
        return self.manifest["protocol"]

    @property
    def nbytes(self) -> int:
        """Bytes of the candidates file (what the index costs on disk and, loaded, in memory)."""
        return (self.path / "candidates.safetensors").stat().st_size

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "CorpusIndex":
        from safetensors import SafetensorError
        from safetensors.torch import load as safetensors_load

        from ..model import WSRA

        path = Path(path)
        if not path.is_dir():
            raise DataError(f"{path}: no such index folder" if not path.exists() else f"{path}: not a folder (an index is one)")
        mf = path / "index.json"
        try:
            manifest = json.loads(mf.read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: not an index (no index.json); build one with `wsra-dist index`") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{mf}: unreadable ({e})") from None
        check_format(manifest, mf)
        check_manifest(manifest, mf)
        tf = path / "candidates.safetensors"
        try:
            raw = tf.read_bytes()
            if manifest.get("sha256") and hashlib.sha256(raw).hexdigest() != manifest["sha256"]:
                raise DataError(f"{tf}: damaged (its sha256 differs from index.json's); rebuild the index")
            t = safetensors_load(raw)
            del raw
            check_dtype(t, manifest, tf)
            check_model_copy(path / "model", manifest)
            model = WSRA.from_pretrained(path / "model", device)
            vids = manifest["videos"]
            layout = manifest.get("layout", "candidates")
            store = store_from_tensors(layout, t, len(vids))
        except DataError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:  # e.g. cut short
            raise DataError(f"{path}: incomplete or damaged index ({type(e).__name__}: {e})") from None
        names, durs = [v["video"] for v in vids], [float(v["duration"]) for v in vids]
        if layout == "didemo_chunks":
            corpus = Corpus.didemo(names, durs, store)
        else:
            corpus = Corpus(names, durs, store, t["video_of"].numpy().astype(np.int64), t["starts"].numpy(),
                            t["ends"].numpy(), manifest["protocol"] == "didemo", t["iou_starts"].numpy(),
                            t["iou_ends"].numpy())
        if store.rows != corpus.size or corpus.size != sum(v["count"] for v in vids):
            raise DataError(f"{path}: candidates.safetensors does not match index.json (damaged index)")
        if manifest.get("hidden", store.hidden) != store.hidden or store.hidden != model.scorer.cfg.hidden:
            raise DataError(f"{path}: the stored projections ({store.hidden}) do not fit index.json's hidden "
                            f"({manifest.get('hidden')}) and the model's ({model.scorer.cfg.hidden}): damaged index")
        if not store.check_finite():
            raise DataError(f"{tf}: holds NaN or infinite values (damaged index); rebuild it")
        apply_ranking(model, manifest.get("ranking"), str(mf))
        return cls(path, manifest, corpus, model)


def check_format(manifest, mf: Path) -> None:
    """A wsra-dist index of a version this code reads (/1 and /2); a newer one is refused, not misread."""
    fmt = str(manifest.get("format", "")) if isinstance(manifest, dict) else "?"
    name, _, version = fmt.partition("/")
    if name != INDEX_FORMAT.split("/")[0]:
        raise DataError(f"{mf}: not a wsra-dist index (format {fmt!r})")
    if version not in READ_VERSIONS:
        raise DataError(f"{mf}: index format {fmt!r} is not one this wsra-dist reads ({', '.join(READ_VERSIONS)}); "
                        "it was written by another version: rebuild the index, or search with that version")


def check_manifest(m: dict, mf: Path) -> None:
    """index.json's fields, each refused by name: a hand edit or a damaged file must not rank wrong moments."""
    import math

    from .store import LAYOUTS

    def bad(what: str):
        raise DataError(f"{mf}: {what}; rebuild the index (or restore index.json)")

    if m.get("protocol") not in ("didemo", "charades", "activitynet"):
        bad(f"protocol {m.get('protocol')!r} is not didemo, charades or activitynet")
    if m.get("layout", "candidates") not in LAYOUTS:
        bad(f"layout {m.get('layout')!r} is not one of {', '.join(LAYOUTS)}")
    vids = m.get("videos")
    if not isinstance(vids, list):
        bad("'videos' is not a list")
    seen, first = set(), 0
    for i, v in enumerate(vids):
        try:
            name, dur, f, c = v["video"], float(v["duration"]), v["first"], v["count"]
        except (KeyError, TypeError, ValueError) as e:
            bad(f"videos[{i}] is damaged ({type(e).__name__}: {e}); each needs video, duration, first, count")
        if not isinstance(name, str) or not name or name in seen:
            bad(f"videos[{i}]: video name {name!r} is empty, not a string or given twice")
        if not (math.isfinite(dur) and dur > 0):
            bad(f"videos[{i}] ({name!r}): duration {v['duration']!r} is not a positive number of seconds")
        if not (isinstance(f, int) and isinstance(c, int)) or f != first or c < 0:
            bad(f"videos[{i}] ({name!r}): first {f!r} / count {c!r} do not follow the previous videos")
        seen.add(name)
        first += c
    if m.get("candidates", first) != first:
        bad(f"candidates {m.get('candidates')!r} is not the videos' {first}")


def check_dtype(t: dict[str, torch.Tensor], manifest: dict, tf: Path) -> None:
    """The stored projections are at the dtype index.json records (a mismatch means the files were mixed)."""
    want = DTYPES.get(manifest.get("dtype"))
    if want is None:
        raise DataError(f"{tf.parent / 'index.json'}: dtype {manifest.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    for k in PROJECTION_KEYS:
        if k in t and t[k].dtype != want:
            raise DataError(f"{tf}: tensor {k!r} is {t[k].dtype}, but index.json says {manifest['dtype']} "
                            "(files from different indexes?); rebuild the index")


def model_copy_sha(folder: Path) -> dict:
    return {f.name: file_sha256(f) for f in sorted(folder.iterdir()) if f.is_file()}


def check_model_copy(folder: Path, manifest: dict) -> None:
    """The model inside the index is the one index.json records (indexes older than this check record none)."""
    want = (manifest.get("model") or {}).get("copy_sha256")
    if want is None:
        return
    have = model_copy_sha(folder) if folder.is_dir() else {}
    for name, sha in want.items():
        if have.get(name) != sha:
            what = "missing" if name not in have else "changed (its sha256 differs from index.json's)"
            raise DataError(f"{folder / name}: {what}; the index's model copy is damaged: rebuild the index")


def bad_video(corpus: Corpus, tensors: dict[str, torch.Tensor]) -> int | None:
    """The first video whose stored values (at the index dtype) or rebuilt projections are not finite, else None:
    fp16 turns features of huge but finite magnitude into inf, which `load` would then refuse."""
    store = store_from_tensors(corpus.store.layout, tensors, len(corpus.videos))
    for k in ("tef", "bias"):
        if k in tensors and not bool(torch.isfinite(tensors[k].float()).all()):
            return 0
    if store.layout == "didemo_chunks":
        ok = (torch.isfinite(store.g.float()).all(1) & torch.isfinite(store.local.float()).all(-1).all(0).all(0)
              & torch.isfinite(store.den).flatten(1).all(1) & torch.isfinite(store.norm).all(1) & (store.norm != 0).all(1))
        for v0, b in store.blocks(1 << 14):  # (21, Vb, H): the values search adds up
            ok[v0 // 21 : v0 // 21 + b.shape[1]] &= torch.isfinite(b).all(-1).all(0)
        bad = (~ok).nonzero()
        return int(bad[0]) if len(bad) else None
    rows = store.pv  # dense: a row per candidate; snippets: a row per snippet
    row_ok = torch.isfinite(rows.float()).all(1)
    if row_ok.all():
        return None
    r = int((~row_ok).nonzero()[0])
    if store.layout == "snippets":
        return int(torch.searchsorted(store.first.long(), torch.tensor(r), right=True)) - 1
    return int(corpus.video_of[r])


def check_finite_before_write(corpus: Corpus, tensors: dict[str, torch.Tensor], dtype: str) -> None:
    v = bad_video(corpus, tensors)
    if v is not None:
        raise DataError(f"video {corpus.videos[v]!r}: its projected features are not finite at {dtype} (NaN, or beyond "
                        f"{'65,504' if dtype == 'fp16' else 'float32 range'}): check its features; nothing was written")


def _stale(out: Path) -> list[tuple[str, Path]]:
    """(kind, folder) of .NAME.tmp-PID / .NAME.old-PID left by a writer that was killed (its PID is gone)."""
    found = []
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = p.name[len(out.name) + 2:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not pid_alive(int(pid)):
            found.append((kind, p))
    return found


def recover(out: Path) -> None:
    """A writer killed between its two renames left the complete old index at .NAME.old-PID and nothing at NAME:
    put it back (before anything reads or replaces NAME), so a kill never loses the index."""
    if out.exists():
        return
    olds = [p for kind, p in _stale(out) if kind == "old" and (p / "index.json").is_file()]
    if olds:
        os.replace(max(olds, key=lambda p: p.stat().st_mtime), out)


def clean_stale(out: Path) -> None:
    """Remove what killed writers left: staging folders, and old indexes once NAME holds an index again."""
    for kind, p in _stale(out):
        if kind == "tmp" or (out / "index.json").is_file() or not (p / "index.json").is_file():
            shutil.rmtree(p, ignore_errors=True)


def ranking_of(model) -> dict:
    """How the checkpoint ranks candidates beyond φ (model.scale_calibration and what it needs), for index.json."""
    from ..evaluation.calibration import ranking_settings

    mode = getattr(model, "scale_calibration", "none")
    d = ranking_settings(model)
    if mode == "standardise":
        d["mu"] = [float(x) for x in model.scale_stats["mu"]]
        d["sd"] = [float(x) for x in model.scale_stats["sd"]]
    return d


def apply_ranking(model, ranking: dict | None, where: str) -> None:
    """Set the ranking attributes index.json records on the index's model (none when an older index has none)."""
    from ..scale_calibration import check_mode

    r = ranking or {}
    try:
        model.scale_calibration = check_mode(r.get("scale_calibration", "none"))
        model.scale_stats = None
        if model.scale_calibration == "contrast":
            model.contrast_weight = float(r["contrast_weight"])
        if model.scale_calibration == "standardise":
            mu, sd = torch.tensor(r["mu"], dtype=torch.float64), torch.tensor(r["sd"], dtype=torch.float64)
            if mu.shape != sd.shape or not (torch.isfinite(mu).all() and (sd > 0).all()):
                raise ValueError("mu/sd must be finite, sd > 0, of equal length")
            model.scale_stats = {"mu": mu, "sd": sd}
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{where}: index.json's ranking is damaged ({e})") from None


def check_same_model(manifest: dict, sha: str, where: str) -> None:
    if manifest["model"]["sha256"] != sha:
        raise DataError(f"{where}: the index was built with another model (weights sha256 "
                        f"{manifest['model']['sha256'][:12]}..., this checkpoint {sha[:12]}...); build a new index")


def merge(a: Corpus | None, b: Corpus, where: str = "", indexed: set | frozenset = frozenset()) -> Corpus:
    """a + b; a video of b already in a is refused, named as the index's (`indexed`) or an earlier source's."""
    if a is None:
        return b
    shared = set(a.videos) & set(b.videos)
    if shared:
        first = sorted(shared)[0]
        at = f"{where}: " if where else ""
        if first in indexed:
            raise DataError(f"{at}the index already holds video {first!r} ({len(shared)} in all); give only new "
                            "videos to append")
        raise DataError(f"{at}video {first!r} ({len(shared)} in all) is also in an earlier source of this command; "
                        "each video is indexed once")
    n = len(a.videos)
    return Corpus(a.videos + b.videos, a.durations + b.durations, cat_stores(a.store, b.store),
                  np.concatenate([a.video_of, b.video_of + n]), np.concatenate([a.starts, b.starts]),
                  np.concatenate([a.ends, b.ends]), a.grid, np.concatenate([a.iou_starts, b.iou_starts]),
                  np.concatenate([a.iou_ends, b.iou_ends]))


def check_out(out: str | Path) -> Path:
    """--out must be a new folder, an empty one, or an index to append to (checked before any projecting)."""
    out = Path(out).resolve()  # `--out .` names the folder, not ''
    recover(out)
    if out.exists() and not (out / "index.json").is_file():
        if not out.is_dir() or any(out.iterdir()):
            raise DataError(f"--out {out} exists and is not an index: give a new folder or an index to append to")
    if not out.parent.is_dir():
        raise DataError(f"--out {out}: the folder {out.parent} does not exist")
    return out


def write_index(out: str | Path, corpus: Corpus, model, manifest: dict, dtype: str) -> Path:
    """Write the index to a staging folder and swap it in (an existing index is replaced only when complete)."""
    from safetensors.torch import save_file

    out = check_out(out)
    clean_stale(out)
    tensors = corpus.store.tensors(DTYPES[dtype])
    check_finite_before_write(corpus, tensors, dtype)  # before anything is written: the old index stays as it was
    stage = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        counts = np.bincount(corpus.video_of, minlength=len(corpus.videos))
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else np.zeros(0, int)
        if corpus.store.layout != "didemo_chunks":  # which implies its 21 spans; the others store them
            tensors.update({"video_of": torch.as_tensor(corpus.video_of, dtype=torch.int32),
                            **{k: torch.as_tensor(np.ascontiguousarray(getattr(corpus, k), dtype=np.float64))
                               for k in ("starts", "ends", "iou_starts", "iou_ends")}})
        tf = stage / "candidates.safetensors"
        save_file(tensors, str(tf))
        manifest = {**manifest, "format": INDEX_FORMAT, "dtype": dtype, "layout": corpus.store.layout,
                    "candidates": corpus.size, "hidden": corpus.store.hidden, "sha256": file_sha256(tf),
                    "videos": [{"video": v, "duration": d, "first": int(f), "count": int(c)}
                               for v, d, f, c in zip(corpus.videos, corpus.durations, first, counts)]}
        model.save_pretrained(stage / "model")
        manifest["model"] = {**manifest["model"], "copy_sha256": model_copy_sha(stage / "model")}
        (stage / "index.json").write_text(json.dumps(manifest, indent=1))
        readable(stage)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
        clean_stale(out)  # an old index a killed writer left is obsolete now that NAME holds one
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def readable(folder: Path) -> None:
    """Files as the user's umask allows (safetensors and staging write 0600/0700; an index is meant to be shared,
    e.g. by `serve` under another account)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [folder, *folder.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def build_index(checkpoint: str | Path, sources: list[str], out: str | Path, dtype: str | None = "fp16",
                device: str | torch.device = "cpu", progress=None, features: list[str] | None = None,
                fps: float | None = None) -> Path:
    """Project every video of `sources` (shard folders) and `features` (features files or folders, see
    features_source.py) with the checkpoint's φ and write (or extend) the index at `out`."""
    from ..evaluation.predict import load_run

    if dtype is not None and dtype not in DTYPES:
        raise DataError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not sources and not features:
        raise DataError("give the videos to index: --shards DIR or --features FILE_OR_DIR")
    if fps is not None and not features:
        raise DataError("--fps gives the time axis of --features without a features manifest; shards record theirs")
    seen: dict = {}
    for flag, src in [("--shards", x) for x in sources] + [("--features", x) for x in features or []]:
        key = Path(src).resolve()
        if key in seen:
            raise DataError(f"{flag} {src} is given twice (as {seen[key]}): each video is indexed once")
        seen[key] = f"{flag} {src}"
    out = check_out(out)
    from .candidates import corpus_ranking

    if not Path(checkpoint).is_dir():
        raise DataError(f"--checkpoint {checkpoint}: no such run folder")
    model, info = load_run(checkpoint, device)
    corpus_ranking(model)  # φ (or standardise) across videos, never the within-video contrast
    sha = weights_sha256(checkpoint)
    existing = CorpusIndex.load(out) if (out / "index.json").is_file() else None
    if existing is not None:
        check_same_model(existing.manifest, sha, str(out))
        dtype = dtype or existing.manifest["dtype"]  # appending: the index's own unless --dtype says otherwise
        if existing.manifest["dtype"] != dtype:
            raise DataError(f"{out}: the index is {existing.manifest['dtype']}; append with --dtype {existing.manifest['dtype']}")
    dtype = dtype or "fp16"
    state = {"corpus": existing.corpus if existing else None,
             "indexed": frozenset(existing.corpus.videos) if existing else frozenset(),
             "feats": list(existing.manifest["features"]) if existing else [],
             "protocol": existing.protocol if existing else None}
    for src in sources:
        _add_shards(state, model, info, src, torch.device(device), progress)
    for spec in features or []:
        _add_features(state, model, info, spec, torch.device(device), fps, progress)
    manifest = {"protocol": state["protocol"], "model": {"sha256": sha, "checkpoint": str(checkpoint),
                                                         "recipe": info.get("recipe_name"), "text": info.get("text", {})},
                "ranking": ranking_of(model), "features": state["feats"]}
    return write_index(out, state["corpus"], model, manifest, dtype)


def _join(state: dict, part: Corpus, protocol: str, where: str, provenance: dict, progress) -> None:
    if state["protocol"] is not None and protocol != state["protocol"]:
        raise DataError(f"{where}: {protocol!r} videos cannot join a {state['protocol']!r} index")
    state["protocol"] = protocol
    state["corpus"] = merge(state["corpus"], part, where, state["indexed"])
    state["feats"].append({"source": where, "videos": len(part.videos), **provenance})
    if progress:
        progress(f"{where}: {len(part.videos)} videos, {part.size} candidates")


def _add_shards(state: dict, model, info: dict, src: str, device, progress) -> None:
    from ..data.loader import ShardSource
    from ..evaluation.predict import check_compatible
    from .candidates import read_split

    source = ShardSource.open(src)
    check_compatible(info, source.manifest, src)
    p = source.manifest.get("benchmark")
    if state["protocol"] is not None and p != state["protocol"]:
        raise DataError(f"{src}: {p!r} shards cannot join a {state['protocol']!r} index")
    part, _ = read_split(model, source, p, device)
    _join(state, part, p, str(Path(src).resolve()), {"extractor": source.manifest.get("extractor"),
                                     "text": source.manifest.get("text", {}).get("model"),
                                     "shards_sha256": hashlib.sha256("".join(source.shas).encode()).hexdigest()},
          progress)


def _add_features(state: dict, model, info: dict, spec: str, device, fps, progress) -> None:
    from ..data.features_manifest import read_manifest
    from .features_source import read_features_corpus

    p = Path(spec)
    part = read_features_corpus(model, info, spec, device, fps)
    made = read_manifest(p) if p.exists() else None
    _join(state, part, info.get("benchmark"), str(p.resolve()),
          {"extractor": (made or {}).get("extractor") or info.get("extractor"), "fps": fps,
           "features_sha256": _features_sha(p)}, progress)


def _features_sha(p: Path) -> str:
    """sha256 over the features' file names, sizes and modification times (provenance, not a content hash:
    hashing a 100 GB feature release would dominate indexing)."""
    files = sorted(p.glob("*.npy")) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)};".encode())
    return h.hexdigest()

"""Realistic planted profiles: features planted for the REAL annotation files (their sentences, times,
annotator disagreement, lengths and defects), so choices are made on data as hard as the benchmarks.

The visual signal of a moment comes from its sentence's content words through a hidden random mapping:
each content word (lower-cased, crudely stemmed, stop words dropped) has a hidden latent vector and a
visibility (about a third of the words - "camera", "begins", "first" - show nothing); a sentence's
signature is a fixed random tanh map of the visibility-weighted sum of its words' latents.  A snippet or
chunk carries every sentence of its video in proportion to how much of it the sentence's annotated
moment covers (DiDeMo: the fraction of annotators whose span holds the chunk, so their disagreement
becomes soft edges), plus distractor events (other videos' sentences nobody here describes), a per-video
scene vector and temporally smoothed noise.  The noise and distractor levels are chosen so the literal
paper recipe lands near the paper's published numbers (docs/method.md, "Realistic profiles").

DiDeMo's public snapshot has no train file: when none is given, a seeded 80 % of the val file's videos
becomes the train split and the rest the val split (the test file stays the test split); `realistic.json`
records where every split came from.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .records import DataError

PROFILES = ("didemo-real", "charades-real", "activitynet-real")

STOP = set("""a an the and or but of to in on at by for with from into onto over under up down out off
about as is are was were be been being am do does did has have had it its it's this that these those there
here then than so very just also again still while when where who whom which what his her hers him he she
they them their theirs we us our you your i me my mine some any all each both other another one two three
first second last next begins starts continues finally back away around through across near toward towards
can could will would should may might not no yes""".split())


def content_words(sentence: str) -> list[str]:
    """Lower-cased content words with a crude stem (plural and -ing/-ed endings), stop words dropped."""
    words = []
    for w in re.findall(r"[a-z]+", sentence.lower()):
        if w in STOP or len(w) < 3:
            continue
        for suffix in ("ing", "ed", "es", "s"):
            if w.endswith(suffix) and len(w) - len(suffix) >= 3:
                w = w[: -len(suffix)]
                break
        words.append(w)
    return words


@dataclass
class Difficulty:
    """How hard a profile is: signal amplitude per moment, noise, distractors and invisible words."""

    noise: float  # std of the per-snippet noise, relative to a unit-norm signature
    smooth: float  # AR(1) coefficient of the noise over time (real features are smooth)
    distractors: float  # mean number of undescribed events per video
    invisible: float  # fraction of content words with no visual trace
    scene: float = 1.2  # norm of the per-video scene vector


DEFAULTS = {
    "didemo-real": Difficulty(noise=1.6, smooth=0.0, distractors=1.5, invisible=0.35),
    "charades-real": Difficulty(noise=1.6, smooth=0.5, distractors=8.0, invisible=0.35),
    "activitynet-real": Difficulty(noise=1.6, smooth=0.5, distractors=8.0, invisible=0.35),
}


class HiddenMapping:
    """word -> (latent, visibility), sentence -> unit signature in R^dim; deterministic in (seed, word)."""

    def __init__(self, dim: int, seed: int, invisible: float, k: int = 64):
        self.dim, self.seed, self.invisible, self.k = dim, seed, invisible, k
        self.mix = np.random.default_rng(seed + 104729).standard_normal((k, dim)) / np.sqrt(k)
        self._words: dict[str, tuple[np.ndarray, float]] = {}
        self._sentences: dict[str, np.ndarray] = {}  # the distractor pool and the videos ask for the same ones

    def word(self, w: str) -> tuple[np.ndarray, float]:
        if w not in self._words:
            h = int.from_bytes(hashlib.blake2b(f"{self.seed}:{w}".encode(), digest_size=8).digest(), "little")
            rng = np.random.default_rng(h)
            z = rng.standard_normal(self.k)
            vis = 0.0 if rng.random() < self.invisible else float(rng.uniform(0.5, 1.5))
            self._words[w] = (z, vis)
        return self._words[w]

    def signature(self, sentence: str) -> np.ndarray:
        """Unit-norm signature, or zeros when no content word is visible (a query the video cannot show)."""
        if sentence not in self._sentences:
            self._sentences[sentence] = self._signature(sentence)
        return self._sentences[sentence]

    def _signature(self, sentence: str) -> np.ndarray:
        u, total = np.zeros(self.k), 0.0
        for w in content_words(sentence):
            z, vis = self.word(w)
            u += vis * z
            total += vis * vis
        if total == 0.0:
            return np.zeros(self.dim)
        x = np.tanh(u / np.sqrt(total) @ self.mix * 1.5)
        return x / np.linalg.norm(x)


def _noise(rng: np.random.Generator, T: int, dim: int, d: Difficulty) -> np.ndarray:
    e = rng.standard_normal((T, dim)) / np.sqrt(dim) * d.noise
    if d.smooth > 0:  # AR(1) with the same marginal variance
        a, b = d.smooth, np.sqrt(1 - d.smooth ** 2)
        for t in range(1, T):
            e[t] = a * e[t - 1] + b * e[t]
    return e


def _plant(rng, cover: np.ndarray, sigs: np.ndarray, dim: int, d: Difficulty, pool: list[np.ndarray],
           span_len) -> np.ndarray:
    """(T, dim) features: scene + Σ_q cover[q, t]·a_q·sig_q + distractors + noise.  cover: (Q, T) in [0, 1]."""
    T = cover.shape[1]
    x = np.tile(rng.standard_normal(dim) / np.sqrt(dim) * d.scene, (T, 1))
    amp = rng.uniform(0.8, 1.2, len(sigs))
    x += (cover * amp[:, None]).T @ sigs
    for _ in range(int(rng.poisson(d.distractors))):
        if not pool:
            break
        n = span_len(rng, T)
        s = int(rng.integers(0, T - n + 1))
        x[s : s + n] += rng.uniform(0.8, 1.2) * pool[int(rng.integers(len(pool)))]
    return x + _noise(rng, T, dim, d)


def _interval_cover(times: Sequence[Sequence[float]], T: int, slot: float) -> np.ndarray:
    """Fraction of each snippet [t·slot, (t+1)·slot) covered by [s, e] seconds, one row per moment."""
    edges = np.arange(T + 1) * slot
    out = np.zeros((len(times), T))
    for i, (s, e) in enumerate(times):
        s, e = min(s, e), max(s, e)
        out[i] = np.clip(np.minimum(edges[1:], e) - np.maximum(edges[:-1], s), 0, None) / slot
    return out


def _split_rng(seed: int, split: str) -> np.random.Generator:
    """One generator per split and purpose: the test subset must not change with --videos."""
    return np.random.default_rng([seed, int.from_bytes(hashlib.blake2b(split.encode(), digest_size=4).digest(), "little")])


def _subset(rng, items: list, n: int | None) -> list:
    if n is None or n >= len(items):
        return items
    keep = set(rng.choice(len(items), size=n, replace=False).tolist())
    return [x for i, x in enumerate(items) if i in keep]  # file order kept


def _held_out(seed: int, all_train: list, train_keep: list, eval_videos: int | None) -> tuple[list, list]:
    """(train, val) videos for the snippet benchmarks' validation split: a seeded part of the official training
    file's videos (a fifth of the kept training videos, at most --eval-videos).  Taken from the training videos
    that --videos left out when there are enough, so the train split (and its features) stays as without it;
    otherwise carved out of the kept ones (train then loses them).  The test split is never touched."""
    n = max(1, round(0.2 * len(train_keep)))
    if eval_videos is not None:
        n = min(n, eval_videos)
    kept = set(train_keep)
    rest = [v for v in all_train if v not in kept]
    if len(rest) >= n:
        return train_keep, _subset(_split_rng(seed, "val"), rest, n)
    val = set(_subset(_split_rng(seed, "val"), list(train_keep), n))
    return [v for v in train_keep if v not in val], [v for v in train_keep if v in val]


def _find(annotations: Sequence[str | Path], names: Sequence[str]) -> dict[str, Path]:
    """Map official file names to paths: each argument is a file or a folder holding them."""
    found: dict[str, Path] = {}
    for a in annotations:
        p = Path(a)
        if p.is_dir():
            for n in names:
                if (p / n).is_file():
                    found.setdefault(n, p / n)
        elif p.is_file():
            if p.name not in names:
                raise DataError(f"{p}: not one of this profile's annotation files ({', '.join(names)})")
            found[p.name] = p
        else:
            raise DataError(f"{p}: no such file or folder")
    return found


class _Staging:
    """Write into OUT/.synth-staging, then move every file into OUT at the end (nothing half-written)."""

    def __init__(self, out: Path, profile: str):
        self.out = out
        self.dir = out / ".synth-staging"
        prev = out / "realistic.json"
        if out.is_dir():
            try:
                mine = json.loads(prev.read_text()).get("profile") if prev.is_file() else None
            except (ValueError, AttributeError, OSError):  # unreadable: not provably ours, so refuse below
                mine = None
            others = [p.name for p in out.iterdir() if p.name != ".synth-staging"]
            if others and mine != profile:  # never mix two benchmarks in one folder, never delete the user's files
                raise DataError(f"{out}: --out is not empty ({', '.join(sorted(others)[:3])}"
                                f"{', ...' if len(others) > 3 else ''}) and is not an earlier {profile} output: "
                                f"choose an empty or new folder")
        if self.dir.exists():
            shutil.rmtree(self.dir)
        (self.dir / "features").mkdir(parents=True)

    def __enter__(self) -> "_Staging":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is not None:  # failed or interrupted: nothing half-written is left behind
            shutil.rmtree(self.dir, ignore_errors=True)

    def __truediv__(self, name: str) -> Path:
        return self.dir / name

    def commit(self) -> None:
        for p in sorted(self.dir.rglob("*")):
            if p.is_file():
                dest = self.out / p.relative_to(self.dir)
                dest.parent.mkdir(parents=True, exist_ok=True)
                p.replace(dest)
        shutil.rmtree(self.dir)


def _provenance(out: Path, profile: str, seed: int, d: Difficulty, splits: dict, sources: dict) -> None:
    (out / "realistic.json").write_text(json.dumps(
        {"profile": profile, "seed": seed, "difficulty": asdict(d), "splits": splits, "sources": sources}, indent=1))


# ---------------------------------------------------------------------------------------------- DiDeMo
def write_didemo_real(annotations: Sequence[str | Path], out: Path, seed: int = 0, d: Difficulty | None = None,
                      videos: int | None = None, eval_videos: int | None = None, dim: int = 1024) -> dict:
    """{train,val,test}_data.json (real records, unchanged) + average_global_flow.h5 (6, dim) per video."""
    import h5py

    from . import didemo

    d = d or DEFAULTS["didemo-real"]
    files = _find(annotations, ["train_data.json", "val_data.json", "test_data.json"])
    if "test_data.json" not in files or not ({"train_data.json", "val_data.json"} & set(files)):
        raise DataError("didemo-real needs test_data.json and train_data.json or val_data.json "
                        f"(given: {', '.join(map(str, annotations))})")
    for p in files.values():
        didemo.read_annotations(p)  # validates every record, naming file and index
    raw = {n: json.loads(p.read_text()) for n, p in files.items()}
    rng = np.random.default_rng(seed)  # the 80/20 split, then the features (subsets have generators of their own)
    sources: dict[str, str] = {}

    def by_video(recs: list[dict]) -> dict[str, list[dict]]:
        g: dict[str, list[dict]] = {}
        for r in recs:
            g.setdefault(r["video"], []).append(r)
        return g

    groups: dict[str, dict[str, list[dict]]] = {}
    if "train_data.json" in raw:
        groups["train"] = by_video(raw["train_data.json"])
        sources["train"] = str(files["train_data.json"])
        if "val_data.json" in raw:
            groups["val"] = by_video(raw["val_data.json"])
            sources["val"] = str(files["val_data.json"])
    if "val" not in groups and "val_data.json" in raw:
        vg = by_video(raw["val_data.json"])
        names = list(vg)
        order = rng.permutation(len(names))
        cut = int(round(0.8 * len(names))) if "train" not in groups else 0
        if "train" not in groups:
            groups["train"] = {names[i]: vg[names[i]] for i in sorted(order[:cut])}
            sources["train"] = f"{files['val_data.json']} (a seeded 80 % of its videos: no train file given)"
        groups["val"] = {names[i]: vg[names[i]] for i in sorted(order[cut:])}
        sources["val"] = f"{files['val_data.json']}" + (" (the other 20 % of its videos)" if cut else "")
    groups["test"] = by_video(raw["test_data.json"])
    sources["test"] = str(files["test_data.json"])
    for split in groups:
        cap = videos if split == "train" else eval_videos
        keep = _subset(_split_rng(seed, split), list(groups[split]), cap)
        groups[split] = {v: groups[split][v] for v in keep}

    mapping = HiddenMapping(dim, seed, d.invisible)
    pool = [mapping.signature(r["description"]) for r in (q for g in groups["train"].values() for q in g)]
    pool = [p for p in pool if p.any()]
    out.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()
    sizes = {}
    with _Staging(out, "didemo-real") as stage, h5py.File(stage / "average_global_flow.h5", "w") as h5:
        for split, g in groups.items():
            records = []
            for video, recs in g.items():
                records += recs
                if video in written:  # the same video in two files keeps one feature set
                    continue
                written.add(video)
                segs = max(r["num_segments"] for r in recs)
                cover = np.zeros((len(recs), 6))
                for i, r in enumerate(recs):
                    for s, e in r["times"]:
                        cover[i, s : e + 1] += 1.0 / len(r["times"])
                cover[:, segs:] = 0.0
                sigs = np.stack([mapping.signature(r["description"]) for r in recs])
                x = np.zeros((6, dim))
                x[:segs] = _plant(rng, cover[:, :segs], sigs, dim, d, pool,
                                  lambda rg, T: int(rg.integers(1, min(3, T) + 1)))
                h5.create_dataset(video, data=x.astype(np.float32))
            (stage / f"{split}_data.json").write_text(json.dumps(records))
            sizes[split] = {"videos": len(g), "queries": len(records)}
        h5.close()
        _provenance(stage.dir, "didemo-real", seed, d, sizes, sources)
        stage.commit()
    return {"splits": sizes, "features": str(out / "average_global_flow.h5")}


# ---------------------------------------------------------------------------------------------- Charades-STA
def write_charades_real(annotations: Sequence[str | Path], out: Path, seed: int = 0, d: Difficulty | None = None,
                        videos: int | None = None, eval_videos: int | None = None, dim: int = 1024,
                        snippets_per_second: float = 1.0) -> dict:
    """charades_sta_{train,val,test}.txt + Charades_v1_{train,val,test}.csv (real lines and rows of the kept videos,
    unchanged) + features/{vid}.npy (T, dim), T = round(duration × snippets_per_second).  Charades-STA has no
    validation split: val is a seeded part of the training file's videos (`_held_out`), written last so the
    train and test features are those written without it."""
    from . import charades

    d = d or DEFAULTS["charades-real"]
    names = ["charades_sta_train.txt", "charades_sta_test.txt", "Charades_v1_train.csv", "Charades_v1_test.csv"]
    files = _find(annotations, names)
    missing = [n for n in names if n not in files]
    if missing:
        raise DataError(f"charades-real needs {', '.join(missing)} (given: {', '.join(map(str, annotations))})")
    rng = np.random.default_rng(seed)  # the training subset, then the features
    mapping = HiddenMapping(dim, seed, d.invisible)
    plan = {}
    for split in ("train", "test"):
        durations = charades.read_durations(files[f"Charades_v1_{split}.csv"])
        recs, _ = charades.read_annotations(files[f"charades_sta_{split}.txt"], durations, "clamp",
                                            str(files[f"Charades_v1_{split}.csv"]))
        lines = files[f"charades_sta_{split}.txt"].read_text().splitlines(keepends=True)
        by_vid: dict[str, list] = {}
        for r in recs:
            by_vid.setdefault(r.video, []).append(r)
        keep = (_subset(rng, list(by_vid), videos) if split == "train"
                else _subset(_split_rng(seed, split), list(by_vid), eval_videos))
        plan[split] = (durations, by_vid, keep, lines)
    durations, by_vid, keep, lines = plan["train"]
    train_keep, val_keep = _held_out(seed, list(by_vid), keep, eval_videos)
    plan["train"] = (durations, by_vid, train_keep, lines)
    plan["val"] = (durations, by_vid, val_keep, lines)
    pool = [mapping.signature(r.sentence) for v in plan["train"][2] for r in plan["train"][1][v]]
    pool = [p for p in pool if p.any()]
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    with _Staging(out, "charades-real") as stage:
        for split, (durations, by_vid, keep, lines) in plan.items():
            kept = set(keep)
            for vid in keep:
                dur = durations[vid]
                T = max(8, int(round(dur * snippets_per_second)))
                slot = dur / T
                cover = _interval_cover([r.times[0] for r in by_vid[vid]], T, slot)
                sigs = np.stack([mapping.signature(r.sentence) for r in by_vid[vid]])
                x = _plant(rng, cover, sigs, dim, d, pool, lambda rg, T: int(rg.integers(max(2, T // 8), max(3, T // 3) + 1)))
                np.save(stage / "features" / f"{vid}.npy", x.astype(np.float32), allow_pickle=False)
            # Lines of kept videos (defective ones too: the shard reader applies its rule); CSV rows of kept videos.
            (stage / f"charades_sta_{split}.txt").write_text("".join(
                ln for ln in lines if ln.strip() and ln.split(" ", 1)[0] in kept))
            src = files[f"Charades_v1_{'train' if split == 'val' else split}.csv"].read_text().splitlines(keepends=True)
            (stage / f"Charades_v1_{split}.csv").write_text(src[0] + "".join(
                ln for ln in src[1:] if ln.split(",", 1)[0] in kept))
            sizes[split] = {"videos": len(keep), "queries": sum(len(by_vid[v]) for v in keep)}
        _provenance(stage.dir, "charades-real", seed, d, sizes, {n: str(p) for n, p in files.items()})
        stage.commit()
    return {"splits": sizes, "features": str(out / "features")}


# ---------------------------------------------------------------------------------------------- ActivityNet
def write_activitynet_real(annotations: Sequence[str | Path], out: Path, seed: int = 0, d: Difficulty | None = None,
                           videos: int | None = None, eval_videos: int | None = None, dim: int = 500,
                           snippets_per_second: float = 0.5, max_snippets: int = 200) -> dict:
    """{train,val,val_1,val_2}.json (the real entries of the kept videos, unchanged) + sub_activitynet_v1-3.c3d.hdf5.
    val_1 and val_2 describe the same videos: one feature set carries both files' sentences, so choosing on val_1
    is choosing on val_2's videos.  val.json is a validation split of the method's own: a seeded part of
    train.json's videos (`_held_out`), its features written last (train's and val_1/2's stay as without it)."""
    import h5py

    from . import activitynet

    d = d or DEFAULTS["activitynet-real"]
    files = _find(annotations, ["train.json", "val_1.json", "val_2.json"])
    if "train.json" not in files or not ({"val_1.json", "val_2.json"} & set(files)):
        raise DataError("activitynet-real needs train.json and val_1.json and/or val_2.json "
                        f"(given: {', '.join(map(str, annotations))})")
    recs = {n: activitynet.read_annotations(p, "clamp")[0] for n, p in files.items()}
    raw = {n: json.loads(p.read_text()) for n, p in files.items()}
    train_keep = _subset(_split_rng(seed, "train"), list(raw["train.json"]), videos)
    ids_before = [v for v in train_keep]
    train_keep, val_keep = _held_out(seed, list(raw["train.json"]), train_keep, eval_videos)
    kept_val = set(val_keep)
    eval_ids = list(dict.fromkeys(v for n in raw if n != "train.json" for v in raw[n]))
    eval_keep = _subset(_split_rng(seed, "eval"), eval_ids, eval_videos)
    rng = _split_rng(seed, "features")
    mapping = HiddenMapping(dim, seed, d.invisible)
    kept_train = set(train_keep)
    pool = [mapping.signature(r.sentence) for r in recs["train.json"] if r.video in kept_train]
    pool = [p for p in pool if p.any()]
    moments: dict[str, list] = {}
    durations: dict[str, float] = {}
    for n, rs in recs.items():
        keep = (kept_train | kept_val) if n == "train.json" else set(eval_keep)
        for r in rs:
            if r.video in keep:
                moments.setdefault(r.video, []).append(r)
                durations[r.video] = r.duration
    out.mkdir(parents=True, exist_ok=True)
    from .synthetic import ACTIVITYNET_FEATURES

    with _Staging(out, "activitynet-real") as stage:
        with h5py.File(stage / ACTIVITYNET_FEATURES, "w") as h5:
            # the features' generator runs in the order written before val existed: train (as drawn), eval, val
            for vid in ([v for v in ids_before if v in kept_train] + [v for v in eval_keep if v not in kept_train]
                        + [v for v in val_keep if v not in eval_keep]):
                if vid not in moments:  # every moment of the video was a defect
                    continue
                dur = durations[vid]
                T = int(np.clip(round(dur * snippets_per_second), 8, max_snippets))
                cover = _interval_cover([r.times[0] for r in moments[vid]], T, dur / T)
                sigs = np.stack([mapping.signature(r.sentence) for r in moments[vid]])
                x = _plant(rng, cover, sigs, dim, d, pool, lambda rg, T: int(np.clip(round(rg.uniform(0.1, 0.3) * T), 2, T)))
                h5.create_group(vid).create_dataset("c3d_features", data=x.astype(np.float32))
        sizes = {}
        for n, src, keep in [(n, n, train_keep if n == "train.json" else [v for v in eval_keep if v in raw[n]])
                             for n in raw] + [("val.json", "train.json", val_keep)]:
            (stage / n).write_text(json.dumps({v: raw[src][v] for v in keep if v in moments}))
            sizes[n[:-5]] = {"videos": sum(v in moments for v in keep),
                             "queries": sum(len(raw[src][v]["sentences"]) for v in keep if v in moments)}
        _provenance(stage.dir, "activitynet-real", seed, d, sizes, {n: str(p) for n, p in files.items()})
        stage.commit()
    return {"splits": sizes, "features": str(out / ACTIVITYNET_FEATURES)}


def synth_real(profile: str, annotations: Sequence[str | Path], out: str | Path, seed: int = 0,
               videos: int | None = None, eval_videos: int | None = None, noise: float | None = None) -> dict:
    """Write a realistic planted benchmark; `noise` overrides the profile's calibrated noise level."""
    if profile not in PROFILES:
        raise DataError(f"realistic profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    if not annotations:
        raise DataError(f"--profile {profile} needs --annotations (the real annotation files or their folder)")
    for name, n in (("--videos", videos), ("--eval-videos", eval_videos)):
        if n is not None and n < 1:
            raise DataError(f"{name} must be at least 1 video, got {n}")
    if noise is not None and not (math.isfinite(noise) and noise >= 0):
        raise DataError(f"--noise must be a finite number >= 0, got {noise}")
    d = DEFAULTS[profile]
    if noise is not None:
        d = Difficulty(**{**asdict(d), "noise": noise})
    writer = {"didemo-real": write_didemo_real, "charades-real": write_charades_real,
              "activitynet-real": write_activitynet_real}[profile]
    return writer(annotations, Path(out), seed, d, videos, eval_videos)

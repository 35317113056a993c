"""The planted benchmark: a weakly-supervised grounding set written in the official file formats.

Sentences describe events (a verb concept acting on an object concept) in natural, varied words:
many subjects, several paraphrases per verb and object, modifiers and sentence shapes.  A video's
snippet features carry a nonlinear visual signature of each described event inside its time span,
plus a distractor event nobody describes, a per-video scene vector and noise, so a model has to
learn the language-to-vision mapping from video-level pairs alone.  One paraphrase of every verb is
held out of all written sentences (`heldout_sentence`) to test grounding of unseen wording.
"""

from __future__ import annotations

import csv
import json
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERBS: dict[str, tuple[list[str], str]] = {
    "open": (["opens", "is opening", "pulls open"], "swings open"),
    "close": (["closes", "is closing", "shuts"], "pushes shut"),
    "pick": (["picks up", "lifts", "grabs"], "takes hold of"),
    "put": (["puts down", "sets down", "places"], "lays down"),
    "throw": (["throws", "tosses", "is throwing"], "flings"),
    "wash": (["washes", "is washing", "rinses"], "scrubs"),
    "hold": (["holds", "is holding", "carries"], "clutches"),
    "look": (["looks at", "watches", "stares at"], "gazes at"),
    "kick": (["kicks", "is kicking", "boots"], "punts"),
    "fix": (["fixes", "is repairing", "repairs"], "mends"),
}
OBJECTS: dict[str, list[str]] = {
    "door": ["the door", "a door"],
    "fridge": ["the refrigerator", "the fridge"],
    "book": ["a book", "the book", "a novel"],
    "cup": ["a cup", "the mug", "a glass"],
    "laptop": ["the laptop", "a computer"],
    "ball": ["the ball", "a soccer ball"],
    "box": ["a box", "the cardboard box"],
    "window": ["the window", "a window"],
    "dog": ["the dog", "a puppy"],
    "phone": ["a phone", "the cellphone"],
    "bag": ["the bag", "a backpack"],
    "towel": ["a towel", "the towel"],
}
SUBJECTS = ["a man", "the man", "a woman", "the woman", "a person", "someone", "the girl", "a boy",
            "the child", "a guy", "the lady", "an old man", "a young woman", "the person"]
MODIFIERS = ["", "", "slowly", "quickly", "again", "in the kitchen", "near the window", "for a moment",
             "with both hands", "and then walks away", "while smiling", "in the living room", "carefully"]
SHAPES = ["{s} {v} {o} {m}", "{s} {v} {o} {m}", "we see {s} who {v} {o}", "{s} {m} {v} {o}",
          "the camera shows {s} that {v} {o} {m}", "here {s} {v} {o}"]

EVENTS = [(v, o) for v in VERBS for o in OBJECTS]


@dataclass
class Signatures:
    verb: np.ndarray  # (n_verbs, k)
    obj: np.ndarray  # (n_objects, k)
    mix: np.ndarray  # (3k, D)


def _signatures(dim: int, seed: int, k: int = 48) -> Signatures:
    rng = np.random.default_rng(seed + 7919)
    return Signatures(rng.standard_normal((len(VERBS), k)), rng.standard_normal((len(OBJECTS), k)),
                      rng.standard_normal((3 * k, dim)) / np.sqrt(3 * k))


def signature(sig: Signatures, event: tuple[str, str]) -> np.ndarray:
    """Nonlinear visual signature: verb and object latents and their product through a random tanh map.

    Signed (zero-mean) signatures: all-positive ones would share an "activity" direction, which
    rewards the candidate covering the most events (the whole video) whatever the query."""
    u = sig.verb[list(VERBS).index(event[0])]
    w = sig.obj[list(OBJECTS).index(event[1])]
    z = np.concatenate([u, w, u * w])
    x = np.tanh(z @ sig.mix)
    return x / np.linalg.norm(x)


def sentence(rng: np.random.Generator, event: tuple[str, str], verb_words: list[str] | None = None) -> str:
    v = rng.choice(verb_words or VERBS[event[0]][0])
    text = rng.choice(SHAPES).format(s=rng.choice(SUBJECTS), v=v, o=rng.choice(OBJECTS[event[1]]), m=rng.choice(MODIFIERS))
    return " ".join(text.split()) + "."


def heldout_sentence(event: tuple[str, str], seed: int = 0) -> str:
    """A sentence using the verb paraphrase that no written split ever uses."""
    rng = np.random.default_rng(seed)
    return sentence(rng, event, [VERBS[event[0]][1]])


def _video_events(rng, n_events: int, slots: int, min_len: int, max_len: int) -> list[tuple[int, int]]:
    """Non-overlapping [s, e] (inclusive slot indices) spans."""
    spans: list[tuple[int, int]] = []
    for _ in range(200):
        if len(spans) == n_events:
            break
        length = int(rng.integers(min_len, max_len + 1))
        s = int(rng.integers(0, max(1, slots - length + 1)))
        e = min(s + length - 1, slots - 1)
        if all(e < a or s > b for a, b in spans):
            spans.append((s, e))
    return spans


def _features(rng, slots: int, dim: int, sig: Signatures, spans, events, distractor, noise: float) -> np.ndarray:
    scene = rng.standard_normal(dim) / np.sqrt(dim) * 1.2
    x = np.tile(scene, (slots, 1))
    for (s, e), ev in zip(list(spans) + [distractor[0]], list(events) + [distractor[1]]):
        x[s : e + 1] += rng.uniform(0.8, 1.2) * signature(sig, ev)
    x += rng.standard_normal((slots, dim)) / np.sqrt(dim) * noise
    return x


def _video_name(rng, i: int) -> str:
    user = f"{int(rng.integers(1e7, 1e8))}@N0{int(rng.integers(0, 9))}"
    ext = rng.choice([".mov", ".m4v", ".mp4", ".avi", "."], p=[0.4, 0.25, 0.2, 0.1, 0.05])
    return f"{user}_{int(rng.integers(1e9, 1e10))}_{rng.bytes(5).hex()}{ext}"


def write_didemo(out: Path, videos: int, seed: int, dim: int = 1024, noise: float = 0.8) -> dict:
    """{train,val,test}_data.json + average_global_flow.h5 (+ planted_truth.json)."""
    import h5py

    rng = np.random.default_rng(seed)
    sig = _signatures(dim, seed)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": videos, "val": max(videos // 5, 10), "test": max(videos // 5, 10)}
    truth: dict[str, list] = {}
    ann_id = 0
    tmp = out / ".average_global_flow.h5.tmp"
    with h5py.File(tmp, "w") as h5:
        for split, n in sizes.items():
            records = []
            for _ in range(n):
                name = _video_name(rng, ann_id)
                segs = 6 if rng.random() < 0.8 else 5
                n_ev = int(rng.integers(2, 4))
                spans = _video_events(rng, n_ev + 1, segs, 1, 3)
                idx = rng.choice(len(EVENTS), size=len(spans), replace=False)
                events = [EVENTS[i] for i in idx]
                described, distractor = list(zip(spans[:-1], events[:-1])), (spans[-1], events[-1])
                feats = np.zeros((6, dim))
                feats[:segs] = _features(rng, segs, dim, sig, [d[0] for d in described], [d[1] for d in described],
                                         distractor, noise)
                h5.create_dataset(name, data=feats.astype(np.float32))
                truth[name] = []
                for (s, e), ev in described:
                    n_ann = 4 if rng.random() < 0.97 else int(rng.choice([5, 7]))
                    times = []
                    for _ in range(n_ann):
                        a, b = s, e
                        if rng.random() < 0.2:  # annotators disagree by a chunk now and then
                            if rng.random() < 0.5:
                                a = int(np.clip(a + rng.choice([-1, 1]), 0, b))
                            else:
                                b = int(np.clip(b + rng.choice([-1, 1]), a, segs - 1))
                        times.append([a, b])
                    text = sentence(rng, ev)
                    records.append({"annotation_id": ann_id, "description": text, "video": name,
                                    "dl_link": f"https://www.flickr.com/video_download.gne?id={ann_id}",
                                    "num_segments": segs, "times": times})
                    truth[name].append({"event": list(ev), "span": [s, e], "annotation_id": ann_id})
                    ann_id += 1
                truth[name].append({"event": list(distractor[1]), "span": list(distractor[0]), "distractor": True})
            (out / f"{split}_data.json").write_text(json.dumps(records))
    tmp.replace(out / "average_global_flow.h5")
    (out / "planted_truth.json").write_text(json.dumps({"profile": "didemo", "seed": seed, "videos": truth}))
    return {"splits": sizes, "features": str(out / "average_global_flow.h5")}


def write_charades(out: Path, videos: int, seed: int, dim: int = 1024, noise: float = 0.8,
                   snippets_per_second: float = 1.0) -> dict:
    """charades_sta_{train,test}.txt, Charades_v1_{train,test}.csv, features/{vid}.npy (+ planted_truth.json)."""
    rng = np.random.default_rng(seed)
    sig = _signatures(dim, seed)
    (out / "features").mkdir(parents=True, exist_ok=True)
    sizes = {"train": videos, "test": max(videos // 4, 10)}
    truth: dict[str, list] = {}
    used: set[str] = set()
    for split, n in sizes.items():
        lines, rows = [], []
        for _ in range(n):
            while (vid := "".join(rng.choice(list(string.ascii_uppercase + string.digits), 5))) in used:
                pass
            used.add(vid)
            duration = float(np.round(rng.uniform(20, 40), 2))
            T = max(8, int(round(duration * snippets_per_second)))
            slot = duration / T
            n_ev = int(rng.integers(2, 4))
            spans = _video_events(rng, n_ev + 1, T, max(2, int(4 / slot)), max(3, int(12 / slot)))
            idx = rng.choice(len(EVENTS), size=len(spans), replace=False)
            events = [EVENTS[i] for i in idx]
            feats = _features(rng, T, dim, sig, spans[:-1], events[:-1], (spans[-1], events[-1]), noise)
            np.save(out / "features" / f"{vid}.npy", feats.astype(np.float32), allow_pickle=False)
            rows.append({"id": vid, "subject": "P" + vid[:3], "scene": "Kitchen", "quality": 5, "relevance": 6,
                         "verified": "Yes", "script": "", "objects": "", "descriptions": "", "actions": "",
                         "length": f"{duration:.2f}"})
            truth[vid] = []
            for (s, e), ev in zip(spans[:-1], events[:-1]):
                start, end = round(s * slot, 1), round((e + 1) * slot, 1)
                text = sentence(rng, ev)
                r = rng.random()
                if r < 0.05:  # real defect: end past the video's length
                    end = round(duration + float(rng.uniform(0.1, 3.0)), 1)
                elif r < 0.06 and split == "train":  # real defect: start >= end
                    start, end = end, start
                if rng.random() < 0.01:  # real quirk: a '#' inside the sentence
                    text = text.replace(" ", " #", 1)
                lines.append(f"{vid} {start:.1f} {end:.1f}##{text}")
                truth[vid].append({"event": list(ev), "span": [s * slot, (e + 1) * slot], "line": len(lines) - 1})
            truth[vid].append({"event": list(events[-1]), "span": [spans[-1][0] * slot, (spans[-1][1] + 1) * slot],
                               "distractor": True})
        (out / f"charades_sta_{split}.txt").write_text("\n".join(lines) + "\n")
        with (out / f"Charades_v1_{split}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    (out / "planted_truth.json").write_text(json.dumps({"profile": "charades", "seed": seed, "videos": truth}))
    return {"splits": sizes, "features": str(out / "features")}


ACTIVITYNET_FEATURES = "sub_activitynet_v1-3.c3d.hdf5"
_YOUTUBE_ID = string.ascii_letters + string.digits + "-_"


def _activitynet_spans(rng, T: int, n: int) -> list[tuple[int, int]]:
    """n [s, e] snippet spans (inclusive) of lengths like ActivityNet's: a Beta(1.1, 2) fraction of the video
    (mean 35 %, a tenth above 75 %), at least 2 snippets; they may overlap, as the real sentences do."""
    spans = []
    for _ in range(n):
        length = int(np.clip(round(float(rng.beta(1.1, 2.0)) * T), 2, T))
        s = int(rng.integers(0, T - length + 1))
        spans.append((s, s + length - 1))
    return spans


def write_activitynet(out: Path, videos: int, seed: int, dim: int = 500, noise: float = 0.8,
                      snippets_per_second: float = 0.5) -> dict:
    """{train,val_1,val_2}.json (the release format) + sub_activitynet_v1-3.c3d.hdf5 (group per video with
    `c3d_features` (T, 500)) (+ planted_truth.json).  Videos last 20 s to 6 min (mean about 2 min) at
    `snippets_per_second`; val_1 and val_2 describe the same videos' events with other sentences and slightly
    different boundaries (other annotators), as in the release."""
    import h5py

    rng = np.random.default_rng(seed)
    sig = _signatures(dim, seed)
    out.mkdir(parents=True, exist_ok=True)
    n_val = max(videos // 4, 10)
    truth: dict[str, list] = {}
    used: set[str] = set()
    splits: dict[str, dict] = {"train": {}, "val_1": {}, "val_2": {}}

    def moment(s: int, e: int, slot: float, duration: float, split: str, jitter: float) -> list[float]:
        a, b = s * slot, (e + 1) * slot
        if jitter:  # another annotator: boundaries a few percent of the video away
            a = float(np.clip(a + rng.uniform(-jitter, jitter) * duration, 0.0, b - slot))
            b = float(np.clip(b + rng.uniform(-jitter, jitter) * duration, a + slot, duration))
        a, b = round(a, 2), round(b, 2)
        r = rng.random()
        if r < 0.01:  # real defect: the end past the duration (261 / 134 / 111 in the release)
            b = round(duration + float(rng.uniform(0.1, 5.0)), 2)
        elif r < 0.012 and split == "train":  # real defect: start >= end (4 in train)
            a, b = b, a
        return [a, b]

    def text(ev: tuple[str, str], k: int) -> str:
        t = sentence(rng, ev)
        t = t[0].upper() + t[1:]
        if rng.random() < 0.003:  # real quirks: a newline or a '#' inside the sentence
            t = t.replace(" ", " \n" if rng.random() < 0.5 else " #", 1)
        return t if k == 0 else " " + t  # the release starts all but the first sentence with a space

    tmp = out / f".{ACTIVITYNET_FEATURES}.tmp"
    with h5py.File(tmp, "w") as h5:
        for split, n in (("train", videos), ("val", n_val)):
            for _ in range(n):
                while (vid := "v_" + "".join(rng.choice(list(_YOUTUBE_ID), 11))) in used:
                    pass
                used.add(vid)
                duration = float(np.round(np.clip(np.exp(rng.normal(np.log(100.0), 0.55)), 20.0, 360.0), 2))
                T = max(8, int(round(duration * snippets_per_second)))
                slot = duration / T
                n_ev = int(rng.integers(2, 5))
                spans = _activitynet_spans(rng, T, n_ev)
                d_len = int(np.clip(round(rng.uniform(0.1, 0.3) * T), 2, T))
                d_start = int(rng.integers(0, T - d_len + 1))
                idx = rng.choice(len(EVENTS), size=n_ev + 1, replace=False)
                events = [EVENTS[i] for i in idx]
                distractor = ((d_start, d_start + d_len - 1), events[-1])
                feats = _features(rng, T, dim, sig, spans, events[:-1], distractor, noise)
                h5.create_group(vid).create_dataset("c3d_features", data=feats.astype(np.float32))
                truth[vid] = [{"event": list(ev), "span": [s * slot, (e + 1) * slot]}
                              for (s, e), ev in zip(spans, events[:-1])]
                truth[vid].append({"event": list(events[-1]), "span": [d_start * slot, (d_start + d_len) * slot],
                                   "distractor": True})
                for name, jitter in ((("train", 0.0),) if split == "train" else (("val_1", 0.0), ("val_2", 0.03))):
                    splits[name][vid] = {"duration": duration,
                                         "timestamps": [moment(s, e, slot, duration, name, jitter) for s, e in spans],
                                         "sentences": [text(ev, k) for k, ev in enumerate(events[:-1])]}
    for name, data in splits.items():
        (out / f"{name}.json").write_text(json.dumps(data))
    tmp.replace(out / ACTIVITYNET_FEATURES)
    (out / "planted_truth.json").write_text(json.dumps({"profile": "activitynet", "seed": seed, "videos": truth}))
    return {"splits": {"train": videos, "val_1": n_val, "val_2": n_val}, "features": str(out / ACTIVITYNET_FEATURES)}


def synth(profile: str, out: str | Path, videos: int | None = None, seed: int = 0) -> dict:
    out = Path(out)
    if videos is not None and videos < 1:
        raise ValueError(f"--videos must be at least 1, got {videos}")
    if profile == "didemo":
        info = write_didemo(out, videos or 1200, seed)
    elif profile == "charades":
        info = write_charades(out, videos or 800, seed)
    elif profile == "activitynet":
        info = write_activitynet(out, videos or 800, seed)
    else:
        raise ValueError(f"--profile must be didemo, charades or activitynet, got {profile!r}")
    return info

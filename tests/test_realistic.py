"""Realistic planted profiles (synth --profile *-real): real annotation files kept as they are, features
planted from the sentences' content words, deterministic, and refused inputs named."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.helpers import SHARED, requires_shared
from wsra_dist.data.realistic import (HiddenMapping, DEFAULTS, Difficulty, content_words, synth_real,
                                      write_charades_real)
from wsra_dist.data.records import DataError

ROOT = Path(__file__).resolve().parents[1]


def _didemo_files(folder: Path, n_val: int = 24, n_test: int = 12) -> Path:
    """Tiny DiDeMo val/test files in the official format (no train file, as in the public snapshot)."""
    rng = np.random.default_rng(3)
    words = ["dog", "ball", "car", "door", "woman", "guitar", "tree", "boat"]
    folder.mkdir(parents=True, exist_ok=True)
    aid = 0
    for split, n in (("val", n_val), ("test", n_test)):
        recs = []
        for v in range(n):
            segs = 6 if v % 4 else 5
            for _ in range(3):
                s = int(rng.integers(0, segs))
                e = int(rng.integers(s, segs))
                recs.append({"num_segments": segs, "description": f"the {rng.choice(words)} near a {rng.choice(words)}.",
                             "dl_link": "x", "times": [[s, e], [s, e], [s, min(e + 1, segs - 1)], [s, e]],
                             "video": f"{split}{v}@N00_{v}_ab.mp4", "annotation_id": aid})
                aid += 1
        (folder / f"{split}_data.json").write_text(json.dumps(recs))
    return folder


def test_content_words_drop_stop_words_and_stem():
    assert content_words("The man is opening the doors again.") == ["man", "open", "door"]
    assert content_words("A person begins to play on a phone #2") == ["person", "play", "phone"]
    assert content_words("") == []


def test_hidden_mapping_is_deterministic_and_word_based():
    m1, m2 = HiddenMapping(64, 0, 0.0), HiddenMapping(64, 0, 0.0)
    a = m1.signature("a dog catches the ball")
    assert np.allclose(a, m2.signature("dogs catching a ball"))  # same content words after stemming
    assert abs(np.linalg.norm(a) - 1) < 1e-9
    shared = m1.signature("a dog runs on the beach") @ m1.signature("the dog sleeps on the sofa")
    unrelated = m1.signature("a car drives on a road") @ m1.signature("the woman sings a song")
    assert shared > unrelated
    assert not HiddenMapping(64, 1, 0.0).signature("a dog catches the ball") @ a > 0.99  # another seed, another map
    assert not HiddenMapping(64, 0, 1.0).signature("a dog").any()  # nothing visible: no signal


def test_didemo_real_keeps_records_and_plants_the_annotated_chunks(tmp_path):
    src = _didemo_files(tmp_path / "ann")
    info = synth_real("didemo-real", [src], tmp_path / "out", seed=0)
    out = tmp_path / "out"
    val = json.loads((src / "val_data.json").read_text())
    train = json.loads((out / "train_data.json").read_text())
    new_val = json.loads((out / "val_data.json").read_text())
    assert json.loads((out / "test_data.json").read_text()) == json.loads((src / "test_data.json").read_text())
    assert {r["annotation_id"] for r in train} | {r["annotation_id"] for r in new_val} == {r["annotation_id"] for r in val}
    assert not {r["video"] for r in train} & {r["video"] for r in new_val}  # split by video
    assert all(r in val for r in train + new_val)  # records unchanged
    assert info["splits"]["train"]["videos"] == round(0.8 * 24)
    prov = json.loads((out / "realistic.json").read_text())
    assert "80 %" in prov["sources"]["train"] and prov["difficulty"] == DEFAULTS["didemo-real"].__dict__
    assert not (out / ".synth-staging").exists()
    # the signal: a chunk's features align with its sentence's signature inside the annotated chunks
    mapping = HiddenMapping(1024, 0, DEFAULTS["didemo-real"].invisible)
    inside, outside = [], []
    with h5py.File(out / "average_global_flow.h5") as h5:
        for r in train + new_val:
            x = h5[r["video"]][()]
            assert x.shape == (6, 1024) and x.dtype == np.float32
            if r["num_segments"] == 5:
                assert not x[5].any()
            sig = mapping.signature(r["description"])
            held = {c for s, e in r["times"] for c in range(s, e + 1)}
            for c in range(r["num_segments"]):
                (inside if c in held else outside).append(float(x[c] @ sig))
    assert np.mean(inside) > np.mean(outside) + 0.3


def test_didemo_real_is_deterministic_and_seeded(tmp_path):
    src = _didemo_files(tmp_path / "ann")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        synth_real("didemo-real", [src], tmp_path / name, seed=seed)
    read = lambda n: {k: v[()] for k, v in h5py.File(tmp_path / n / "average_global_flow.h5").items()}  # noqa: E731
    a, b, c = read("a"), read("b"), read("c")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a if k in c)


def test_noise_override_and_caps(tmp_path):
    src = _didemo_files(tmp_path / "ann")
    info = synth_real("didemo-real", [src], tmp_path / "o", seed=0, videos=5, eval_videos=4, noise=0.1)
    assert info["splits"]["train"]["videos"] == 5 and info["splits"]["test"]["videos"] == 4
    assert json.loads((tmp_path / "o" / "realistic.json").read_text())["difficulty"]["noise"] == 0.1


def test_refused_inputs_name_what_is_wrong(tmp_path):
    src = _didemo_files(tmp_path / "ann")
    with pytest.raises(DataError, match="needs --annotations"):
        synth_real("didemo-real", [], tmp_path / "o")
    with pytest.raises(DataError, match="test_data.json"):
        synth_real("didemo-real", [src / "val_data.json"], tmp_path / "o")
    with pytest.raises(DataError, match="no such file"):
        synth_real("didemo-real", [tmp_path / "nope"], tmp_path / "o")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "test_data.json").write_text(json.dumps([{"annotation_id": 1}]))
    (bad / "val_data.json").write_text((src / "val_data.json").read_text())
    with pytest.raises(DataError, match=r"test_data.json: record 0 .*missing key"):
        synth_real("didemo-real", [bad], tmp_path / "o")
    assert not (tmp_path / "o" / "average_global_flow.h5").exists()  # validated before writing
    with pytest.raises(DataError, match="charades_sta_train.txt"):
        synth_real("charades-real", [src], tmp_path / "o")
    with pytest.raises(DataError, match="must be one of"):
        synth_real("didemo-hard", [src], tmp_path / "o")


def test_charades_real_hand_made(tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    for split, vids in (("train", ["AAAAA", "BBBBB", "CCCCC"]), ("test", ["DDDDD", "EEEEE"])):
        lines = [f"{v} {2.0 + i:.1f} {9.5 + i:.1f}##a person opens the door." for i, v in enumerate(vids)]
        lines.append(f"{vids[0]} 20.0 40.0##someone is eating a sandwich.")  # ends past the length: clamped
        (ann / f"charades_sta_{split}.txt").write_text("\n".join(lines) + "\n")
        (ann / f"Charades_v1_{split}.csv").write_text("id,length\n" + "".join(f"{v},{30.4 + i}\n" for i, v in enumerate(vids)))
    write_charades_real([ann], tmp_path / "out", 0, Difficulty(noise=0.0, smooth=0.5, distractors=0, invisible=0.0))
    out = tmp_path / "out"
    assert (out / "charades_sta_test.txt").read_text() == (ann / "charades_sta_test.txt").read_text()
    x = np.load(out / "features" / "AAAAA.npy")
    assert x.shape == (30, 1024) and x.dtype == np.float32
    sig = HiddenMapping(1024, 0, 0.0).signature("a person opens the door.")
    proj = x @ sig - (x @ sig)[0]  # scene removed (no noise, no distractors)
    assert proj[3:9].min() > 0.7 and abs(proj[12:19]).max() < 1e-6  # 2.0-9.5 s carries the door, 12-19 s nothing


@requires_shared
def test_real_files_all_three_profiles_and_the_cli(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "wsra_dist.cli", "synth", "--profile", "didemo-real", "--annotations",
                        str(SHARED / "didemo"), "--out", str(tmp_path / "d"), "--videos", "40", "--eval-videos", "30"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert "Chance" in p.stdout and "Prior: moment frequency" in p.stdout and "Upper bound" in p.stdout
    info = synth_real("charades-real", [SHARED / "charades-sta"], tmp_path / "c", videos=20, eval_videos=10)
    assert info["splits"]["train"]["videos"] == 20 and info["splits"]["test"]["videos"] == 10
    kept = {ln.split(" ")[0] for ln in (tmp_path / "c" / "charades_sta_train.txt").read_text().splitlines()}
    val = {ln.split(" ")[0] for ln in (tmp_path / "c" / "charades_sta_val.txt").read_text().splitlines()}
    test = {ln.split(" ")[0] for ln in (tmp_path / "c" / "charades_sta_test.txt").read_text().splitlines()}
    real_train = {ln.split(" ")[0] for ln in (SHARED / "charades-sta" / "charades_sta_train.txt").read_text().splitlines() if ln.strip()}
    # validation: a seeded fifth of the kept training videos' count, from training videos --videos left out
    assert len(val) == 4 == info["splits"]["val"]["videos"] and val <= real_train and not val & (kept | test)
    assert {ln.split(",")[0] for ln in (tmp_path / "c" / "Charades_v1_val.csv").read_text().splitlines()[1:]} == val
    assert len(kept) == 20 and len(list((tmp_path / "c" / "features").glob("*.npy"))) == 34
    info = synth_real("activitynet-real", [SHARED / "activitynet"], tmp_path / "a", videos=20, eval_videos=10)
    v1 = json.loads((tmp_path / "a" / "val_1.json").read_text())
    v2 = json.loads((tmp_path / "a" / "val_2.json").read_text())
    real_v1 = json.loads((SHARED / "activitynet" / "val_1.json").read_text())
    assert all(v1[k] == real_v1[k] for k in v1)
    tr, va = (json.loads((tmp_path / "a" / f"{n}.json").read_text()) for n in ("train", "val"))
    real_tr = json.loads((SHARED / "activitynet" / "train.json").read_text())
    assert len(va) == 4 and not set(va) & (set(tr) | set(v1) | set(v2)) and all(va[k] == real_tr[k] for k in va)
    with h5py.File(tmp_path / "a" / "sub_activitynet_v1-3.c3d.hdf5") as h5:
        assert set(v1) | set(v2) | set(tr) | set(va) <= set(h5)
        x = h5[next(iter(v1))]["c3d_features"][()]
        assert x.shape[1] == 500 and 8 <= x.shape[0] <= 200


def test_charades_validation_split_carved_from_train_when_nothing_is_left_out(tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    vids = {"train": [f"T{i:04d}" for i in range(10)], "test": ["E0001", "E0002"]}
    for split, vs in vids.items():
        (ann / f"charades_sta_{split}.txt").write_text("".join(f"{v} 1.0 5.0##a person opens the door.\n" for v in vs))
        (ann / f"Charades_v1_{split}.csv").write_text("id,length\n" + "".join(f"{v},20.0\n" for v in vs))
    d = Difficulty(noise=0.0, smooth=0.5, distractors=0, invisible=0.0)
    info = write_charades_real([ann], tmp_path / "a", 0, d)
    read = lambda o, n: {ln.split(" ")[0] for ln in (tmp_path / o / f"charades_sta_{n}.txt").read_text().splitlines()}  # noqa: E731
    assert len(read("a", "val")) == 2 and len(read("a", "train")) == 8 and not read("a", "val") & read("a", "train")
    assert info["splits"]["val"] == {"videos": 2, "queries": 2} and read("a", "test") == set(vids["test"])
    write_charades_real([ann], tmp_path / "b", 0, d, videos=5)  # 5 kept, the val videos from the other 5
    assert len(read("b", "train")) == 5 and len(read("b", "val")) == 1 and not read("b", "val") & read("b", "train")
    write_charades_real([ann], tmp_path / "c", 0, d)
    assert read("c", "val") == read("a", "val")  # seeded


def test_evaluation_subset_does_not_depend_on_the_training_cap(tmp_path):
    src = _didemo_files(tmp_path / "ann", n_val=30, n_test=20)
    synth_real("didemo-real", [src], tmp_path / "a", videos=3, eval_videos=7)
    synth_real("didemo-real", [src], tmp_path / "b", videos=20, eval_videos=7)
    read = lambda n: json.loads((tmp_path / n / "test_data.json").read_text())  # noqa: E731
    assert read("a") == read("b") and len({r["video"] for r in read("a")}) == 7


def test_out_folder_rules(tmp_path):
    src = _didemo_files(tmp_path / "ann")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):  # never mixed into, never deleted
        synth_real("didemo-real", [src], mine)
    assert (mine / "notes.txt").read_text() == "keep me" and not (mine / ".synth-staging").exists()
    synth_real("didemo-real", [src], tmp_path / "o")
    synth_real("didemo-real", [src], tmp_path / "o", seed=1)  # an earlier output of the same profile: replaced
    assert json.loads((tmp_path / "o" / "realistic.json").read_text())["seed"] == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "realistic.json").write_text(json.dumps({"profile": "charades-real"}))
    with pytest.raises(DataError, match="not an earlier didemo-real output"):  # two benchmarks never mix
        synth_real("didemo-real", [src], other)
    (other / "realistic.json").write_text("{not json")  # unreadable provenance: refused, not a traceback
    with pytest.raises(DataError, match="not an earlier didemo-real output"):
        synth_real("didemo-real", [src], other)
    assert (other / "realistic.json").read_text() == "{not json"
    for bad in ({"videos": 0}, {"eval_videos": -1}, {"noise": float("nan")}, {"noise": -1.0}):
        with pytest.raises(DataError, match="--videos|--eval-videos|--noise"):
            synth_real("didemo-real", [src], tmp_path / "n", **bad)
    assert not (tmp_path / "n").exists()


def test_measured_best_recipes_and_paper_recipes_say_what_they_are():
    from wsra_dist.config import load_recipe

    for name, epochs in (("didemo_best", 10), ("charades_best", 5), ("activitynet_best", 5)):
        r = load_recipe(ROOT / "recipes" / f"{name}.yaml", [])
        assert r.name == name and r.train.epochs == epochs and r.loss.w_cross > 0
        assert (ROOT / "recipes" / f"{name}.yaml").read_text().startswith("# Measured-best")
    for name in ("didemo_flow", "didemo_rgb", "didemo_rgb_flow", "charades_i3d"):
        first = (ROOT / "recipes" / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith("# The paper's settings, kept as printed"), name
        r = load_recipe(ROOT / "recipes" / f"{name}.yaml", [])
        assert (r.loss.w_cross, r.optim.lr, r.loss.w_video, r.loss.w_snippet, r.loss.w_batch) == (0, 1e-4, 0.1, 1, 0.1)

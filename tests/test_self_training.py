"""Self-training inside `train` (self_training.rounds; wsra_dist/self_training.py): the built-in phases compute what
the three commands by hand compute, resume skips finished phases, and what cannot work is refused before the
teacher trains."""

import json
import os
import sys
from pathlib import Path

import pytest

from wsra_dist.config import ConfigError, load_recipe
from wsra_dist.data.records import DataError
from wsra_dist.data.shards import load_manifest
from wsra_dist.evaluation.pseudo_labels import pseudo_label
from wsra_dist.stop_signals import Stopped
from wsra_dist.train import train

from .helpers import load_weights, max_weight_diff, run_checked

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "planted_charades.yaml"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train_shards={shards / 'train'}", f"data.val_shards={shards / 'test'}",
            f"data.test_shards={shards / 'test'}", "train.epochs=2", "train.batch_size=8", "train.progress=false",
            "data.num_workers=0", "model.hidden=16", "model.scale_calibration=span", "train.deterministic=true",
            "data.shuffle=true", f"output_dir={out}", *extra]


def _recipe(shards: Path, out: Path, *extra: str):
    return load_recipe(RECIPE, _args(shards, out, *extra))


ROUND = ("self_training.rounds=1", "self_training.span_band=0.5")


@pytest.fixture(scope="module")
def built(planted_charades, tmp_path_factory):
    """One self-training run (teacher, labels with band 0.5, student) on the planted Charades-STA set."""
    out = tmp_path_factory.mktemp("self_training") / "run"
    train(_recipe(planted_charades / "shards", out, *ROUND))
    return out


def test_built_in_phases_equal_the_commands_by_hand(built, planted_charades, tmp_path):
    shards = planted_charades / "shards"
    teacher = tmp_path / "teacher"
    train(_recipe(shards, teacher))
    pseudo_label(teacher, str(shards / "train"), tmp_path / "labels", "cpu", span_band=0.5)
    train(_recipe(shards, tmp_path / "student", "loss.w_supervised=1", f"data.train_shards={tmp_path / 'labels'}"))
    phases = built / "self_training"
    assert max_weight_diff(load_weights(phases / "teacher"), load_weights(teacher)) == 0.0
    assert max_weight_diff(load_weights(built), load_weights(tmp_path / "student")) == 0.0
    assert max_weight_diff(load_weights(built), load_weights(teacher)) > 0  # the student is not the teacher
    pl = load_manifest(phases / "pseudo-labels-1")["pseudo_labels"]
    assert pl["checkpoint"] == str((phases / "teacher").resolve()) and pl["ranking"]["span_band"] == 0.5
    # each phase is a run folder of its own: recipe, history, TensorBoard events
    for run in (phases / "teacher", built):
        assert (run / "recipe.yaml").is_file() and list((run / "tensorboard").rglob("events.out.tfevents*"))
    student = load_recipe(built / "recipe.yaml")
    assert student.loss.w_supervised == 1.0 and student.data.train_shards == str(phases / "pseudo-labels-1")
    assert student.model.span_band == 0.0  # the student ranks by θ alone; only the labels used the band
    pipeline = load_recipe(phases / "recipe.yaml")
    assert pipeline.self_training.rounds == 1 and pipeline.loss.w_supervised == 0.0
    summary = json.loads((phases / "summary.json").read_text())
    assert [r["phase"] for r in summary["phases"]] == ["teacher", "student 1"]
    # each phase's HParams row shows the pipeline's self_training keys and its phase (its own recipe has them off)
    for run, name in ((phases / "teacher", "teacher"), (built, "student 1")):
        hp = _hparams(run)
        assert hp["self_training.rounds"].number_value == 1 and hp["self_training.phase"].string_value == name
        assert hp["self_training.span_band"].number_value == 0.5
    assert summary["phases"][1]["test"] == json.loads((built / "history.json").read_text())["test"]


def _hparams(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    ev = EventAccumulator(str(next((run / "tensorboard").rglob("events.out.tfevents.*")).parent))
    ev.Reload()
    exp = [plugin_data_pb2.HParamsPluginData.FromString(c) for c in ev.PluginTagToContent("hparams").values()]
    return [e for e in exp if e.HasField("session_start_info")][0].session_start_info.hparams


def test_a_finished_run_resumed_trains_nothing_and_a_new_run_there_is_refused(built, planted_charades):
    shards = planted_charades / "shards"
    files = [built / "model.safetensors", built / "self_training" / "teacher" / "model.safetensors",
             built / "self_training" / "pseudo-labels-1" / "manifest.json"]
    before = [f.stat().st_mtime_ns for f in files]
    train(_recipe(shards, built, *ROUND, "resume=latest"))
    assert [f.stat().st_mtime_ns for f in files] == before
    with pytest.raises(ConfigError, match="holds an earlier run"):
        train(_recipe(shards, built, *ROUND))


def test_stopped_in_the_teacher_and_in_the_student_resumes_there(built, planted_charades, tmp_path, monkeypatch):
    """SIGTERM in the teacher, then in the student: each resume=latest keeps what is finished (the teacher and its
    labels are not written again) and continues the phase that stopped from its checkpoint; the weights equal the
    run that was never stopped."""
    shards, out = planted_charades / "shards", tmp_path / "run"
    steps = json.loads((built / "self_training" / "teacher" / "history.json").read_text())["steps"]
    monkeypatch.setenv("WSRA_TEST_SIGTERM_AT_STEP", str(steps - 3))
    with pytest.raises(Stopped):
        train(_recipe(shards, out, *ROUND))
    teacher = out / "self_training" / "teacher"
    assert (teacher / "checkpoints").is_dir() and not (teacher / "model.safetensors").exists()
    monkeypatch.setenv("WSRA_TEST_SIGTERM_AT_STEP", "2")  # the resumed teacher is past it; the student is not
    with pytest.raises(Stopped, match="at step 2"):
        train(_recipe(shards, out, *ROUND, "resume=latest"))
    kept = [teacher / "model.safetensors", out / "self_training" / "pseudo-labels-1" / "manifest.json"]
    before = [f.stat().st_mtime_ns for f in kept]
    assert not (out / "model.safetensors").exists() and (out / "checkpoints").is_dir()
    monkeypatch.delenv("WSRA_TEST_SIGTERM_AT_STEP")
    train(_recipe(shards, out, *ROUND, "resume=latest"))
    assert [f.stat().st_mtime_ns for f in kept] == before
    assert max_weight_diff(load_weights(teacher), load_weights(built / "self_training" / "teacher")) == 0.0
    assert max_weight_diff(load_weights(out), load_weights(built)) == 0.0


def test_labels_of_another_teacher_are_written_again(built, planted_charades, tmp_path):
    """A resumed run whose labels are not its teacher's (weights changed) relabels and retrains the student."""
    import shutil

    shards, out = planted_charades / "shards", tmp_path / "run"
    shutil.copytree(built, out)
    labels = out / "self_training" / "pseudo-labels-1"
    m = json.loads((labels / "manifest.json").read_text())
    m["pseudo_labels"]["weights_sha256"] = "0" * 64
    (labels / "manifest.json").write_text(json.dumps(m))
    train(_recipe(shards, out, *ROUND, "resume=latest"))
    again, first = load_manifest(labels), load_manifest(built / "self_training" / "pseudo-labels-1")
    assert again["pseudo_labels"]["weights_sha256"] == first["pseudo_labels"]["weights_sha256"]
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]
    assert max_weight_diff(load_weights(out), load_weights(built)) == 0.0


def test_another_kept_fraction_relabels_and_keeps_the_teacher(built, planted_charades, tmp_path):
    """self_training.keep changed on resume: the teacher is kept (bitwise), the labels are written again with the
    new weights (the same times), and the student is trained again on them, as by hand."""
    import shutil

    shards, out = planted_charades / "shards", tmp_path / "run"
    shutil.copytree(built, out)
    train(_recipe(shards, out, *ROUND, "self_training.keep=0.5", "resume=latest"))
    labels = load_manifest(out / "self_training" / "pseudo-labels-1")["pseudo_labels"]
    assert labels["keep"] == 0.5 and labels["confidence_floor"] is not None
    assert max_weight_diff(load_weights(out / "self_training" / "teacher"),
                           load_weights(built / "self_training" / "teacher")) == 0.0
    assert max_weight_diff(load_weights(out), load_weights(built)) > 0.0  # fewer supervised times: another student
    by_hand = tmp_path / "labels"
    pseudo_label(built / "self_training" / "teacher", str(shards / "train"), by_hand, "cpu", span_band=0.5, keep=0.5)
    assert [s["sha256"] for s in load_manifest(by_hand)["shards"]] == \
        [s["sha256"] for s in load_manifest(out / "self_training" / "pseudo-labels-1")["shards"]]


def test_a_wider_student_learns_the_same_teacher_s_labels(built, planted_charades, tmp_path):
    """self_training.hidden: the teacher and its labels are the default run's (bitwise); the student is
    model.hidden wide and equals a run by hand with that width; a finished run resumed with another width is refused
    rather than reported as this recipe's student."""
    import shutil

    from wsra_dist.self_training import plan

    shards, out = planted_charades / "shards", tmp_path / "run"
    teacher, student = plan(_recipe(shards, out, *ROUND, "self_training.hidden=24"))
    assert (teacher.recipe.model.hidden, student.recipe.model.hidden) == (16, 24)
    assert plan(_recipe(shards, out, *ROUND))[1].recipe.model.hidden == 16  # 0: the teacher's width
    train(_recipe(shards, out, *ROUND, "self_training.hidden=24"))
    assert max_weight_diff(load_weights(out / "self_training" / "teacher"),
                           load_weights(built / "self_training" / "teacher")) == 0.0
    assert [s["sha256"] for s in load_manifest(out / "self_training" / "pseudo-labels-1")["shards"]] == \
        [s["sha256"] for s in load_manifest(built / "self_training" / "pseudo-labels-1")["shards"]]
    by_hand = tmp_path / "by_hand"
    train(_recipe(shards, by_hand, "loss.w_supervised=1", "model.hidden=24",
                  f"data.train_shards={built / 'self_training' / 'pseudo-labels-1'}"))
    assert max_weight_diff(load_weights(out), load_weights(by_hand)) == 0.0
    assert load_recipe(out / "recipe.yaml").model.hidden == 24
    again = tmp_path / "again"
    shutil.copytree(built, again)
    shape = r"finished student 1 .* another model shape \(model.hidden 16 there, 24 here"
    with pytest.raises(ConfigError, match=shape):
        train(_recipe(shards, again, *ROUND, "self_training.hidden=24", "resume=latest"))
    for bad, why in (("-1", "must be an integer >= 0"), ("1.5", "expected an integer")):
        with pytest.raises(ConfigError, match=f"self_training.hidden:? {why}"):
            _recipe(shards, out, *ROUND, f"self_training.hidden={bad}").validate()


def test_what_cannot_work_is_refused_before_the_teacher_trains(planted_charades, planted_didemo, tmp_path):
    shards = planted_charades / "shards"
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="loss.w_supervised=1 with self_training.rounds=1"):
        _recipe(shards, out, *ROUND, "loss.w_supervised=1").validate()
    with pytest.raises(ConfigError, match="self_training.span_band=0.5 is a parameter of the span ranking"):
        _recipe(shards, out, *ROUND, "model.scale_calibration=none").validate()
    with pytest.raises(ConfigError, match="use resume=latest or resume=auto"):
        _recipe(shards, out, *ROUND, f"resume={tmp_path}").validate()
    with pytest.raises(ConfigError, match="self_training.rounds must be an integer >= 0"):
        _recipe(shards, out, "self_training.rounds=-1").validate()
    with pytest.raises(ConfigError, match="self_training.w_supervised must be a number > 0"):
        _recipe(shards, out, *ROUND, "self_training.w_supervised=0").validate()
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match="self_training.keep must be a number > 0 and <= 1"):
            _recipe(shards, out, *ROUND, f"self_training.keep={bad}").validate()
    didemo = load_recipe(ROOT / "recipes" / "planted_didemo.yaml", [
        f"data.train_shards={planted_didemo / 'shards' / 'train'}", "data.val_shards=", "data.test_shards=",
        f"output_dir={out}", "self_training.rounds=1", "train.progress=false"])
    with pytest.raises(ConfigError, match="'didemo' shards; self-training labels snippet benchmarks"):
        train(didemo)
    labels = tmp_path / "labels"
    pseudo_label(_one_run(planted_charades, tmp_path), str(shards / "train"), labels, "cpu")
    with pytest.raises(ConfigError, match="already pseudo-labelled"):
        train(_recipe(shards, out, *ROUND, f"data.train_shards={labels}"))
    assert not out.exists()  # nothing was written for the refused runs


def _one_run(planted_charades, tmp_path) -> Path:
    run = tmp_path / "one"
    train(_recipe(planted_charades / "shards", run, "train.max_steps=2"))
    return run


def test_a_failed_labelling_leaves_the_teacher_and_says_why(planted_charades, tmp_path, monkeypatch):
    """Labelling that fails (here: a shard the teacher trained on corrupted afterwards) is one DataError; the
    finished teacher is kept, and resume=latest continues from the labels without training it again."""
    import shutil

    from wsra_dist.evaluation import pseudo_labels

    shards = tmp_path / "shards"
    shutil.copytree(planted_charades / "shards", shards)
    out = tmp_path / "run"
    real = pseudo_labels.pseudo_label

    def broken(*a, **k):
        raise DataError("shard-00001.tar: broken on purpose")

    monkeypatch.setattr(pseudo_labels, "pseudo_label", broken)
    with pytest.raises(DataError, match="broken on purpose"):
        train(_recipe(shards, out, *ROUND))
    teacher = out / "self_training" / "teacher" / "model.safetensors"
    t0 = teacher.stat().st_mtime_ns
    assert not (out / "self_training" / "pseudo-labels-1").exists() and not (out / "model.safetensors").exists()
    monkeypatch.setattr(pseudo_labels, "pseudo_label", real)
    train(_recipe(shards, out, *ROUND, "resume=latest"))
    assert teacher.stat().st_mtime_ns == t0 and (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_run_every_phase(planted_charades, tmp_path):
    """Under accelerate launch rank 0 writes the labels while rank 1 waits outside any collective; both train the
    student on them.  The labels are the two-process teacher's top-1 moments, as `pseudo-label` writes them."""
    out = tmp_path / "run"
    p = run_checked([*LAUNCH, "--multi_gpu", "--num_processes", "2", "-m", "wsra_dist.train", str(RECIPE),
                     *_args(planted_charades / "shards", out, *ROUND, "train.batch_size=4")],
                    env={"OMP_NUM_THREADS": "1"})
    text = p.stdout + p.stderr
    assert text.count("training on 2 process(es)") == 2 and "self-training: student 1: test" in text
    by_hand = tmp_path / "labels"
    pseudo_label(out / "self_training" / "teacher", str(planted_charades / "shards" / "train"), by_hand, "cpu",
                 span_band=0.5)
    assert [s["sha256"] for s in load_manifest(by_hand)["shards"]] == \
        [s["sha256"] for s in load_manifest(out / "self_training" / "pseudo-labels-1")["shards"]]
    assert (out / "model.safetensors").is_file() and os.path.getsize(out / "model.safetensors") > 0


def test_a_stop_while_labelling_discards_the_labels_and_resumes_there(built, planted_charades, tmp_path, monkeypatch):
    """SIGTERM while rank 0 writes the labels: no half-written label folder, the teacher is kept, and resume=latest
    writes the labels and trains the student as the run that was never stopped."""
    import signal

    from wsra_dist.evaluation import pseudo_labels

    shards, out = planted_charades / "shards", tmp_path / "run"
    real = pseudo_labels.pseudo_label

    def signalled(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the first video is labelled
        return real(*a, **k)

    monkeypatch.setattr(pseudo_labels, "pseudo_label", signalled)
    with pytest.raises(Stopped, match="while writing the pseudo-labels of student 1"):
        train(_recipe(shards, out, *ROUND))
    phases = out / "self_training"
    assert (phases / "teacher" / "model.safetensors").is_file()
    assert not (phases / "pseudo-labels-1").exists() and not list(phases.glob(".pseudo-labels-1.staging-*"))
    monkeypatch.setattr(pseudo_labels, "pseudo_label", real)
    train(_recipe(shards, out, *ROUND, "resume=latest"))
    assert max_weight_diff(load_weights(out), load_weights(built)) == 0.0


@pytest.mark.slow
def test_deepspeed_runs_every_phase(planted_charades, tmp_path):
    """ZeRO-2 (two CPU processes): each phase prepares its own engine; the one before is destroyed, not reused."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "ds"
    p = run_checked([*LAUNCH, "--config_file", str(ROOT / "recipes" / "deepspeed_zero2.yaml"), "--num_processes", "2",
                     "-m", "wsra_dist.train", str(RECIPE),
                     *_args(planted_charades / "shards", out, *ROUND, "train.batch_size=4", "optim.name=adamw")],
                    env={"OMP_NUM_THREADS": "1"})
    text = p.stdout + p.stderr
    assert "self-training: student 1: test" in text
    # DS_ACCELERATOR=cpu is set for DeepSpeed on CPU, so no rank guesses (and warns); the launcher's own import of
    # DeepSpeed, before any of this code runs, still may
    assert text.count("unable to detect") <= 1
    summary = json.loads((out / "self_training" / "summary.json").read_text())
    assert [bool(r["test"]) for r in summary["phases"]] == [True, True]
    assert max_weight_diff(load_weights(out), load_weights(out / "self_training" / "teacher")) > 0


def test_waiting_for_rank0_ends_when_it_says_so_or_when_its_heartbeat_stops(monkeypatch):
    """peers.await_rank0 (the other ranks while rank 0 labels): returns rank 0's word; waits for a rank 0 whose
    heartbeat goes on however long it takes; ends with the lost-peer line when the heartbeat stops."""
    import threading
    import time

    import torch.distributed as dist

    from wsra_dist import peers

    store = dist.HashStore()
    monkeypatch.setattr(peers, "_store", lambda: store)
    peers.publish("a", "ok")
    assert peers.await_rank0("a", "labelling") == "ok"

    class Watch:
        def _give_up(self, why):
            raise RuntimeError(why)

        def at(self, where, step):
            pass

    monkeypatch.setattr(peers, "_WATCH", Watch())
    store.add("wsra/hb/0", 1)
    with pytest.raises(RuntimeError, match="rank 0's heartbeat stopped while it was labelling"):
        peers.await_rank0("never", "labelling", poll_s=0.01, stall_beats=1)

    def alive_and_slow():
        for _ in range(40):  # beats for longer than stall_beats x HEARTBEAT_S, then answers
            store.add("wsra/hb/0", 1)
            time.sleep(0.05)
        peers.publish("b", "failed")

    t = threading.Thread(target=alive_and_slow)
    t.start()
    assert peers.await_rank0("b", "labelling", poll_s=0.01, stall_beats=1) == "failed"
    t.join()

"""A run folder has one owner (lock, no silent reuse, rotation by the run's own steps) and SIGTERM/SIGINT end a
run with a complete checkpoint from which resume=latest continues exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from wsra_dist.config import ConfigError
from wsra_dist.run_folder import LOCK_FILE, RunLock, check_reuse, previous_run

from .helpers import load_weights, max_weight_diff, run_checked
from .test_train import LAUNCH, RECIPE, _overrides, exact_shards  # noqa: F401 (fixture)


def test_lock_names_its_holder_and_takes_over_a_stale_one(tmp_path):
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_FILE).is_file()
        with pytest.raises(ConfigError, match=rf"in use by another training \(pid {os.getpid()} on "):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()  # released at the end of the run
    # a dead pid on this host: reported and taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    said = []
    with RunLock(tmp_path, warn=said.append):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert said and "stale lock" in said[0] and str(dead.pid) in said[0]
    # another host: cannot be checked, refused with the file to delete
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere-node", "started": "x"}))
    with pytest.raises(ConfigError, match=r"another host: if you know that run is gone, delete"):
        RunLock(tmp_path).acquire()


def test_a_folder_the_lock_made_goes_when_nothing_was_written_in_it(tmp_path):
    with RunLock(tmp_path / "new"):  # a start that fails before writing (bad shards, bad recipe)
        pass
    assert not (tmp_path / "new").exists()
    with RunLock(tmp_path / "kept"):
        (tmp_path / "kept" / "recipe.yaml").write_text("x")
    assert (tmp_path / "kept" / "recipe.yaml").is_file() and not (tmp_path / "kept" / LOCK_FILE).exists()
    (tmp_path / "mine").mkdir()  # the user's own empty folder is theirs: it stays
    with RunLock(tmp_path / "mine"):
        pass
    assert (tmp_path / "mine").is_dir()


def test_reuse_of_a_run_folder_needs_resume_or_overwrite(tmp_path):
    assert check_reuse(tmp_path / "new", "", False) == []
    (tmp_path / "recipe.yaml").write_text("x")  # a start that failed before its first checkpoint: reusable
    assert check_reuse(tmp_path, "", False) == ["recipe.yaml"]
    (tmp_path / "checkpoints" / "step-00000002").mkdir(parents=True)  # a run that got further
    with pytest.raises(ConfigError, match=r"holds an earlier run \(recipe.yaml, checkpoints/\); continue it with "
                                          r"resume=latest"):
        check_reuse(tmp_path, "", False)
    assert check_reuse(tmp_path, "latest", False) == ["recipe.yaml", "checkpoints/"]
    with pytest.raises(ConfigError, match="contradict"):
        check_reuse(tmp_path, "latest", True)


def _base():
    return [sys.executable, "-m", "wsra_dist.train", str(RECIPE)]


def test_second_training_into_a_finished_run_is_refused_and_overwrite_replaces(exact_shards, tmp_path):
    out = tmp_path / "run"
    run_checked([*_base(), *_overrides(exact_shards, out, 8, 6, "adam", ["train.checkpoint_every=2",
                                                                       "train.keep_checkpoints=2"])])
    before = load_weights(out)
    p = run_checked([*_base(), *_overrides(exact_shards, out, 8, 2, "adam")], check=False)
    assert p.returncode == 2 and "holds an earlier run" in p.stderr and "overwrite=true" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert max_weight_diff(before, load_weights(out)) == 0.0  # nothing touched
    # overwrite: a shorter run replaces it; its checkpoints are the new run's (old step-6 and step-4 removed)
    run_checked([*_base(), *_overrides(exact_shards, out, 8, 2, "adam", ["train.checkpoint_every=1",
                                                                       "overwrite=true"])])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    assert json.loads((out / "history.json").read_text())["steps"] == 2


def test_concurrent_training_on_one_folder_is_refused(exact_shards, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([*_base(), *_overrides(exact_shards, out, 8, 400, "adam", ["train.epochs=200"])],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if (out / LOCK_FILE).exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        p = run_checked([*_base(), *_overrides(exact_shards, out, 8, 1, "adam", ["resume=auto"])], check=False)
        assert p.returncode == 2 and f"in use by another training (pid {first.pid} on" in p.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step" in err + _ and not (out / LOCK_FILE).exists()


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["false", "true"])
def test_sigterm_checkpoints_and_resume_matches_uninterrupted(exact_shards, tmp_path, cache):
    """(also with the device-resident split: a mid-epoch resume continues its order exactly)"""
    extra = ["train.epochs=3", "data.shuffle=true", "model.dropout=0.1", "train.deterministic=true",
             "data.shuffle_buffer=10", f"data.device_cache={cache}"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_checked([*_base(), *_overrides(exact_shards, full, 16, 7, "adam", extra)])
    p = run_checked([*_base(), *_overrides(exact_shards, cut, 16, 7, "adam", extra)],
                    env={"WSRA_TEST_SIGTERM_AT_STEP": "5"}, check=False)
    assert p.returncode == 143, p.stderr[-2000:]
    assert "stopped by SIGTERM at step 5; resume with resume=latest" in p.stdout + p.stderr
    assert sorted(x.name for x in (cut / "checkpoints").iterdir())[-1] == "step-00000005"  # mid-epoch 2
    assert not (cut / "model.safetensors").exists()
    run_checked([*_base(), *_overrides(exact_shards, cut, 16, 7, "adam", extra), "resume=latest"])
    assert max_weight_diff(load_weights(full), load_weights(cut)) <= 1e-7


@pytest.mark.slow
def test_sigterm_on_one_of_two_processes_stops_both_at_the_same_step(exact_shards, tmp_path):
    out = tmp_path / "two"
    p = run_checked([*LAUNCH, "--multi_gpu", "--num_processes", "2", "-m", "wsra_dist.train", str(RECIPE),
                     *_overrides(exact_shards, out, 8, 7, "adam", ["train.epochs=3"])],
                    env={"WSRA_TEST_SIGTERM_AT_STEP": "4", "WSRA_TEST_SIGTERM_RANK": "1"}, check=False)
    assert p.returncode != 0
    assert (p.stdout + p.stderr).count("stopped by SIGTERM at step 4; resume with resume=latest") == 1
    ck = out / "checkpoints" / "step-00000004"
    assert ck.is_dir() and (ck / "random_states_1.pkl").is_file() and (ck / "random_states_0.pkl").is_file()

"""Issue #24 QA defects: every bad input or fault ends in one line naming the file / URL / option, and nothing
the user had is lost (shard folders, loader-worker errors, failed starts, resume=latest, device options)."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

from wsra_dist.data.records import DataError

from .helpers import run_checked
from .test_train import RECIPE, _overrides, exact_shards  # noqa: F401 (fixture)


def _train_cmd() -> list[str]:
    return [sys.executable, "-m", "wsra_dist.train", str(RECIPE)]


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------- (e) shard folders
def test_a_missing_shard_folder_is_named_not_its_parents_manifest(exact_shards, tmp_path):
    from wsra_dist.data.loader import ShardSource

    nope = tmp_path / "nope" / "train"
    with pytest.raises(DataError, match=r"nope/train: the shard folder does not exist"):
        ShardSource.open(str(nope))
    with pytest.raises(DataError, match=r"nope: the shard folder does not exist \(from the pattern"):
        ShardSource.open(str(tmp_path / "nope" / "shard-{000000..000001}.tar"))
    with pytest.raises(DataError, match=r"shard-000099.tar: no such shard file"):
        ShardSource.open(str(exact_shards / "shard-000099.tar"))
    assert len(ShardSource.open(str(exact_shards / "shard-000000.tar")).urls) == 1  # a single shard file still works


def test_a_truncated_shard_names_the_file_without_the_stream_object(exact_shards, tmp_path):
    from wsra_dist.data.shards import iter_shard, load_manifest

    m = load_manifest(exact_shards)
    bad = tmp_path / "shard-000000.tar"
    data = (exact_shards / "shard-000000.tar").read_bytes()
    bad.write_bytes(data[: len(data) // 2 + 77])
    with pytest.raises(DataError) as e:
        list(iter_shard(str(bad), m, None))
    text = str(e.value)
    assert text.startswith(str(bad)) and "unexpected end of data" in text
    assert " @ " not in text and "BufferedReader" not in text  # webdataset's appended file-object repr


# ------------------------------------------------------------------------------------ (a) loader-worker errors
def _corrupt_copy(shards: Path, dst: Path) -> Path:
    """A copy of the shard set whose second shard has the manifest's size but other bytes (sha256 mismatch)."""
    import shutil

    shutil.copytree(shards, dst)
    victim = dst / "shard-000001.tar"
    data = bytearray(victim.read_bytes())
    rnd = random.Random(1)
    data[:4096] = bytes(rnd.randrange(256) for _ in range(4096))
    victim.write_bytes(bytes(data))
    return victim


def test_a_shard_error_in_a_loader_worker_is_the_one_line_of_num_workers_0(exact_shards, tmp_path):
    victim = _corrupt_copy(exact_shards, tmp_path / "shards")
    ov = _overrides(tmp_path / "shards", tmp_path / "run", 8, 6)
    ov[ov.index("data.num_workers=0")] = "data.num_workers=2"
    p = run_checked([*_train_cmd(), *ov], check=False)
    assert p.returncode == 2
    line = _one_error_line(p.stderr)  # was "Caught DataError in DataLoader worker process 1." + 21 traceback lines
    assert line.startswith(f"error: {victim}: sha256 ") and "does not match the manifest" in line


# ------------------------------------------------------------------------------------------- (c) failed starts
def test_a_failed_start_does_not_block_the_next_run_into_its_folder(exact_shards, tmp_path):
    out = tmp_path / "run"
    # a setting this machine cannot serve is found before anything is written (was an "internal error" at step 1)
    p = run_checked([*_train_cmd(), *_overrides(exact_shards, out, 8, 2), "model.pair_kernel=triton"], check=False)
    assert p.returncode == 2 and "model.pair_kernel=triton needs triton and a CUDA device" in _one_error_line(p.stderr)
    assert not (out / "recipe.yaml").exists() and not (out / "tensorboard").exists()
    # a failure after the folder is prepared (a corrupt second shard): recipe.yaml and TensorBoard events are left
    _corrupt_copy(exact_shards, tmp_path / "bad")
    p = run_checked([*_train_cmd(), *_overrides(tmp_path / "bad", out, 8, 6)], check=False)
    assert p.returncode == 2 and (out / "recipe.yaml").is_file() and not (out / "model.safetensors").exists()
    events = sorted(x.name for x in (out / "tensorboard").iterdir())
    # the next run into the folder trains without overwrite=true; the failed start's files are kept aside
    p = run_checked([*_train_cmd(), *_overrides(exact_shards, out, 8, 2)])
    assert (out / "model.safetensors").is_file() and "an earlier start there failed" in p.stdout + p.stderr
    aside = list(out.glob("failed-start-*"))
    assert len(aside) == 1 and (aside[0] / "recipe.yaml").is_file()
    assert sorted(x.name for x in (aside[0] / "tensorboard").iterdir()) == events
    # a finished run is still protected
    p = run_checked([*_train_cmd(), *_overrides(exact_shards, out, 8, 2)], check=False)
    assert p.returncode == 2 and "holds an earlier run" in _one_error_line(p.stderr)


# ------------------------------------------------------------------------------------------ (d) resume=latest
def test_resume_latest_without_a_checkpoint_refuses_to_replace_a_finished_model(exact_shards, tmp_path):
    from wsra_dist.config import ConfigError
    from wsra_dist.run_folder import check_reuse

    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"resume=latest: .* holds a finished run \(model.safetensors\) but no "
                                          r"checkpoint to continue from; nothing was changed. .*overwrite=true"):
        check_reuse(tmp_path / "f", "latest", False)
    assert check_reuse(tmp_path / "f", "auto", False) == ["model.safetensors"]  # auto: from scratch when nothing
    assert check_reuse(tmp_path / "new", "latest", False) == []  # nothing there: latest starts a new run
    out = tmp_path / "run"
    run_checked([*_train_cmd(), *_overrides(exact_shards, out, 8, 2)])  # 2 steps: no checkpoint is written
    assert not (out / "checkpoints").exists()
    before = (out / "model.safetensors").read_bytes()
    p = run_checked([*_train_cmd(), *_overrides(exact_shards, out, 8, 3), "resume=latest"], check=False)
    assert p.returncode == 2 and "no checkpoint to continue from" in _one_error_line(p.stderr)
    assert (out / "model.safetensors").read_bytes() == before  # was silently retrained from scratch and replaced
    p = run_checked([*_train_cmd(), *_overrides(exact_shards, out, 8, 3), "resume=auto"])
    assert "resume=auto: no complete checkpoint yet, starting from scratch (this replaces" in p.stdout

"""Beyond one machine: a lost peer ends the survivors with one line naming it, resume is exactly-once,
`latest` is only ever a complete checkpoint, the launcher's restart continues in place, and a killed
trainer leaves no orphans.  Two nodes are simulated on loopback: two `accelerate launch` commands with
--num_machines 2 --machine_rank R, one process each, the same output_dir."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import load_weights, max_weight_diff

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "planted_didemo.yaml"
PY = sys.executable


@pytest.fixture(scope="module")
def shards(planted_didemo) -> Path:
    return planted_didemo / "shards" / "train"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(shards: Path, out: Path, extra=()) -> list[str]:
    return [str(RECIPE), f"data.train_shards={shards}", "data.val_shards=", "data.test_shards=", "train.batch_size=8",
            "optim.lr=1e-4", "data.shuffle=true", "data.shuffle_buffer=50", "seed=3", f"output_dir={out}",
            "train.progress=false", "train.process_group_timeout_s=30", *extra]


def _node(rank: int, port: int, args: list[str], env=None, log: Path | None = None) -> subprocess.Popen:
    cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
           "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "wsra_dist.train", *args]
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _two_nodes(args: list[str], tmp: Path, name: str, env=None, timeout: float = 400) -> tuple[int, int, str]:
    port = _free_port()
    logs = [tmp / f"{name}-node{r}.log" for r in (0, 1)]
    procs = [_node(r, port, args, env, logs[r]) for r in (0, 1)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        _kill(procs)
    return codes[0], codes[1], logs[0].read_text() + logs[1].read_text()


def _alive_with(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (the run's unique output_dir)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = next((l for l in (d / "status").read_text().splitlines() if l.startswith("State:")), "")
            except OSError:
                continue
            if marker in cmd and "zombie" not in state:
                out.append(f"{d.name}: {cmd[:160]}")
    return out


def _error_lines(log: str) -> list[str]:
    return [l for l in log.splitlines() if l.startswith("error: ")]


def _start_and_wait_for(args: list[str], tmp: Path, ready: Path) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Both nodes started; returns once `ready` exists (the run got going), or fails with node 0's log."""
    port = _free_port()
    nodes = (_node(0, port, args, log=tmp / "n0.log"), _node(1, port, args, log=tmp / "n1.log"))
    deadline = time.time() + 300
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.2)
    if not ready.exists():
        _kill(nodes)
        pytest.fail((tmp / "n0.log").read_text()[-3000:])
    return nodes


def _kill(nodes) -> None:
    for p in nodes:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- 1. a dead node
@pytest.mark.slow
def test_a_dead_node_ends_the_survivor_with_one_line(shards, tmp_path):
    out = tmp_path / "run"
    args = _args(shards, out, ["train.epochs=100000", "train.checkpoint_every=5"])
    n0, n1 = _start_and_wait_for(args, tmp_path, out / "checkpoints" / "step-00000005")
    try:
        os.killpg(n1.pid, signal.SIGKILL)  # node 1's launcher and everything in its session
        t = time.time()
        code = n0.wait(timeout=30 + 30)  # train.process_group_timeout_s + 30 s
        took = time.time() - t
    finally:
        _kill((n0, n1))
    log = (tmp_path / "n0.log").read_text()
    assert code != 0 and took < 60
    lines = _error_lines(log)
    assert len(lines) == 1, log[-3000:]
    # where it stopped depends on the moment of the kill: a step, the per-step stop-signal all-reduce, an
    # epoch's loss all-reduce, or a checkpoint (every 5 steps here); each names the collective it was in
    assert re.search(r"lost peer: rank 1 \(.*node 1\) stopped responding; rank 0 of 2 stopped in (the training "
                     r"step|the stop-signal all-reduce|the epoch's loss all-reduce|a checkpoint|the end-of-epoch "
                     r"checkpoint).* at step \d+: ", lines[0]), lines[0]
    time.sleep(2)
    assert not _alive_with(str(out)), _alive_with(str(out))  # node 1's worker died with its launcher


@pytest.mark.slow
def test_a_hung_peer_is_named_after_the_process_group_timeout(shards, tmp_path):
    out = tmp_path / "run"
    args = _args(shards, out, ["train.epochs=100000", "train.process_group_timeout_s=8"])
    n0, n1 = _start_and_wait_for(args, tmp_path, out / "tensorboard")
    worker = None
    try:
        time.sleep(3)
        kids = subprocess.run(["pgrep", "-P", str(n1.pid)], capture_output=True, text=True).stdout.split()
        assert kids, "node 1 has no worker"
        worker = int(kids[0])
        os.kill(worker, signal.SIGSTOP)  # alive, sockets open, never answers: only a timeout can tell
        t = time.time()
        code = n0.wait(timeout=8 + 30)
        took = time.time() - t
    finally:
        _kill((n0, n1))
        if worker:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(worker, sig)
                except ProcessLookupError:
                    pass
    lines = _error_lines((tmp_path / "n0.log").read_text())
    assert code != 0 and took < 8 + 30 and len(lines) == 1
    assert "lost peer: rank 1" in lines[0] and "stopped responding" in lines[0], lines


def test_the_watchdog_ends_a_collective_stuck_beyond_the_timeout(tmp_path):
    """A wait the process group's timeout does not cover (a library barrier, NCCL's abort path): the watch
    thread prints the line and exits 3."""
    code = f"""
import time
from wsra_dist import peers
peers.GRACE_S = 0.5
class Store:
    def __init__(self): self.d = {{}}
    def add(self, k, n):
        if k == "wsra/hb/0": self.d[k] = self.d.get(k, 0) + n
        return self.d.get(k, 0)
    def set(self, k, v): self.d[k] = v.encode() if isinstance(v, str) else v
    def get(self, k): return self.d[k]
    def set_timeout(self, t): pass
w = peers.PeerWatch(1.0, 0, 2, Store())
w.begin("a stuck barrier", 17)
time.sleep(30)
print("still here")
"""
    p = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 3 and "still here" not in p.stdout
    assert "lost peer: rank 1 stopped responding; rank 0 of 2 stopped in a stuck barrier at step 17" in p.stderr


# ----------------------------------------------------------------------------- 2. exactly-once resume
def _steps(log_dir: Path, rank: int) -> list[dict]:
    f = log_dir / f"samples-rank{rank}.jsonl"
    return [json.loads(l) for l in f.read_text().splitlines()] if f.is_file() else []


@pytest.mark.slow
def test_relaunch_after_a_lost_node_is_exactly_once_and_matches_an_uninterrupted_run(shards, tmp_path):
    extra = ["train.epochs=2", "train.checkpoint_every=5"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    c0, c1, log = _two_nodes(_args(shards, full, extra), tmp_path, "full", {"WSRA_SAMPLE_LOG": str(tmp_path / "lf")})
    assert c0 == c1 == 0, log[-3000:]
    # node 1 dies at step 8: the last complete checkpoint is step 5, steps 6-8 are lost with it
    c0, c1, log = _two_nodes(_args(shards, cut, extra), tmp_path, "cut",
                             {"WSRA_SAMPLE_LOG": str(tmp_path / "l1"), "WSRA_TEST_SIGKILL_AT_STEP": "8",
                              "WSRA_TEST_SIGKILL_RANK": "1"})
    assert c0 != 0 and c1 != 0
    assert any("lost peer: rank 1" in l for l in _error_lines(log)), log[-3000:]
    assert not (cut / "model.safetensors").exists()
    # the same two commands again, with resume=latest
    c0, c1, log = _two_nodes(_args(shards, cut, [*extra, "resume=latest"]), tmp_path, "resume",
                             {"WSRA_SAMPLE_LOG": str(tmp_path / "l2")})
    assert c0 == c1 == 0, log[-3000:]
    assert "resumed from" in log and "step-00000005" in log
    assert max_weight_diff(load_weights(full), load_weights(cut)) <= 1e-5
    # exactly once: the steps that count (<= 5 from the first attempt, > 5 from the relaunch) use every
    # query of every epoch once, and are the uninterrupted run's steps
    from wsra_dist.data.loader import EpochLoader, ShardSource

    from wsra_dist.config import load_recipe
    from wsra_dist.train import min_global_batch

    src = ShardSource.open(str(shards))
    need = min_global_batch(load_recipe(RECIPE, []).loss)
    for r in (0, 1):
        kept = [s for s in _steps(tmp_path / "l1", r) if s["step"] <= 5] + _steps(tmp_path / "l2", r)
        assert [s["step"] for s in kept] == [s["step"] for s in _steps(tmp_path / "lf", r)]
        assert kept == _steps(tmp_path / "lf", r)
    for epoch in (0, 1):
        ids = [i for r in (0, 1) for s in _steps(tmp_path / "lf", r) if s["epoch"] == epoch for i in s["ids"]]
        plan = EpochLoader(src, 8, world=2, rank=0, seed=3, min_global_batch=need).plan(epoch)
        assert len(ids) == len(set(ids)) == sum((plan.batches - 1) * 8 + last for last in plan.last)


# ----------------------------------------------------------------------------- 3. complete checkpoints
def test_latest_skips_an_incomplete_checkpoint_and_names_what_is_missing(shards, tmp_path):
    from wsra_dist.config import ConfigError, load_recipe
    from wsra_dist.train import train

    out = tmp_path / "run"
    r = load_recipe(RECIPE, _args(shards, out, ["train.max_steps=4", "train.checkpoint_every=2",
                                                "train.keep_checkpoints=3"])[1:])
    train(r)
    ck = sorted((out / "checkpoints").glob("step-*"))
    assert [c.name for c in ck] == ["step-00000002", "step-00000004"]
    assert json.loads((ck[-1] / "checkpoint_manifest.json").read_text())["world"] == 1
    (ck[-1] / "random_states_0.pkl").unlink()  # as if a node's file never reached the shared storage
    warnings = []
    from wsra_dist.train import find_resume

    r2 = load_recipe(RECIPE, _args(shards, out, ["train.max_steps=6", "resume=latest"])[1:])
    assert find_resume(r2, warnings.append) == ck[0]
    assert len(warnings) == 1 and "step-00000004" in warnings[0] and "random_states_0.pkl missing" in warnings[0]
    (ck[0] / "checkpoint_manifest.json").unlink()  # never finished
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        find_resume(r2, warnings.append)
    assert "checkpoint_manifest.json (written last" in warnings[-1]
    r3 = load_recipe(RECIPE, _args(shards, out, ["train.max_steps=6", "resume=auto"])[1:])
    assert find_resume(r3) is None  # auto: from scratch
    r4 = load_recipe(RECIPE, _args(shards, out, ["train.max_steps=6", f"resume={ck[-1]}"])[1:])
    with pytest.raises(ConfigError, match="not a complete checkpoint .*random_states_0.pkl missing"):
        find_resume(r4)


def test_a_checkpoint_of_two_ranks_lists_both_and_misses_none(tmp_path):
    from wsra_dist import checkpoints as C

    d = tmp_path / "step-00000003"
    d.mkdir()
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"):
        (d / name).write_bytes(name.encode())
    C.write_manifest(d, 2, 3, [C.describe_files(d, 0), C.describe_files(d, 1)])
    files = json.loads((d / C.MANIFEST).read_text())["files"]
    assert files["random_states_1.pkl"]["rank"] == 1 and files["optimizer.bin"]["rank"] is None
    assert C.problems(d) == [] and C.latest_complete(tmp_path) == d
    (d / "random_states_1.pkl").write_bytes(b"other")
    assert C.problems(d) == ["random_states_1.pkl has 5 bytes, not 19"]
    m = json.loads((d / C.MANIFEST).read_text())
    m["files"] = {k: v for k, v in m["files"].items() if v["rank"] != 1}
    (d / C.MANIFEST).write_text(json.dumps(m))
    assert C.problems(d) == ["no files of rank 1"] and C.latest_complete(tmp_path) is None


# ----------------------------------------------------------------------------- 4. restart in place
@pytest.mark.slow
def test_launcher_restart_continues_from_the_latest_checkpoint(shards, tmp_path):
    extra = ["train.epochs=2", "train.checkpoint_every=5", "resume=auto"]
    base = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1", "--num_processes", "2",
            "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run([*base, "-m", "wsra_dist.train", *_args(shards, tmp_path / "full", extra)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    assert full.returncode == 0, full.stderr[-3000:]
    # c10d rendezvous; --main_process_ip gives its store a host.  The restarted workers connect through the
    # launcher's store, which still holds the killed round's gloo addresses: without a namespace per round
    # (wsra_dist/peers.py init_process_group) ~1 restart in 3 connected to a dead port (docs/reliability.md).
    cut = tmp_path / "cut"
    base[base.index("--main_process_port") + 1] = str(_free_port())
    p = subprocess.run([*base, "--max_restarts", "3", "--rdzv_backend", "c10d", "--main_process_ip", "127.0.0.1",
                        "-m", "wsra_dist.train", *_args(shards, cut, extra)],
                       cwd=ROOT, capture_output=True, text=True, timeout=400,
                       env={**env, "WSRA_TEST_SIGKILL_AT_STEP": "8", "WSRA_TEST_SIGKILL_RANK": "1"})
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    assert "resume=auto: no complete checkpoint yet" in log and "resumed from" in log and "step-00000005" in log
    assert "connectFullMesh failed" not in log and log.count("failed (exitcode") == 1, log[-3000:]  # one restart
    assert max_weight_diff(load_weights(tmp_path / "full"), load_weights(cut)) <= 1e-5


def test_each_launcher_round_gets_its_own_namespace_in_the_shared_store():
    """The launcher's store outlives its rounds of workers: a restarted round must never read the previous
    round's keys (gloo's addresses), whoever of its processes arrives first (peers._agree_on_round)."""
    import threading
    from datetime import timedelta

    import torch.distributed as dist

    from wsra_dist import peers

    server = dist.TCPStore("127.0.0.1", 0, 1, True, timedelta(seconds=10), wait_for_workers=False)
    tokens = []
    for delays in ((0.0, 0.0, 0.0), (0.0, 0.4, 0.2), (0.4, 0.0, 0.1)):  # rank 0 first, last
        got, errors = {}, []

        def join(rank, delay):
            time.sleep(delay)
            try:
                client = dist.TCPStore("127.0.0.1", server.port, 1, False, timedelta(seconds=10))
                got[rank] = peers._agree_on_round(client, rank, 3, 10)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=join, args=(r, d)) for r, d in enumerate(delays)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors and len(got) == 3 and len(set(got.values())) == 1, (got, errors)
        tokens.append(got[0])
    assert len(set(tokens)) == 3  # a new namespace every round
    t0 = time.time()  # a rank that never comes: bounded, named
    with pytest.raises(peers.StartupError, match=r"rank\(s\) 1, 2 of 3 did not arrive within 1 s"):
        peers._agree_on_round(dist.TCPStore("127.0.0.1", server.port, 1, False, timedelta(seconds=10)), 0, 3, 1)
    assert time.time() - t0 < 5


# ----------------------------------------------------------------------------- 5. no orphans
def test_a_killed_trainer_leaves_no_loader_workers(shards, tmp_path):
    out = tmp_path / "orphans"
    p = subprocess.run([PY, "-m", "wsra_dist.train", *_args(shards, out, ["train.epochs=50", "data.num_workers=2"])],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "WSRA_TEST_SIGKILL_AT_STEP": "3"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    deadline = time.time() + 10
    while _alive_with(str(out)) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive_with(str(out)), _alive_with(str(out))

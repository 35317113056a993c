"""Remote shards (pipe:, http://): a stall fails after data.read_timeout_s naming the URL, a failing command is
named with its exit status, and no process of the command outlives the reader (checked with ps)."""

import functools
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from wsra_dist.data.records import DataError
from wsra_dist.data.shards import iter_shard, load_manifest

from .helpers import run_checked
from .test_train import RECIPE, _overrides, exact_shards  # noqa: F401 (fixture)


def _procs(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if marker in ln and "ps -eo" not in ln]


def _gone(marker: str, within: float = 5.0) -> bool:
    end = time.time() + within
    while time.time() < end:
        if not _procs(marker):
            return True
        time.sleep(0.1)
    return False


def _first(shards):
    m = load_manifest(shards)
    return shards / m["shards"][0]["name"], m


def test_a_stalled_source_fails_after_the_timeout_and_leaves_no_process(exact_shards):
    shard, m = _first(exact_shards)
    url = f"pipe:head -c 3000 {shard}; sleep 61.25"
    t = time.time()
    with pytest.raises(DataError, match=r"no data for 1.5 s \(data.read_timeout_s\): the shard source stalled") as e:
        list(iter_shard(url, m, None, read_timeout_s=1.5))
    assert url in str(e.value) and time.time() - t < 15
    assert _gone("sleep 61.25")


def test_a_failing_command_is_named_with_its_status(exact_shards, tmp_path):
    _, m = _first(exact_shards)
    url = f"pipe:cat {tmp_path / 'absent.tar'}"
    with pytest.raises(DataError) as e:
        list(iter_shard(url, m, None, read_timeout_s=10))
    text = str(e.value)
    assert text.startswith(url) and "exited with status 1" in text and "No such file" in text
    assert "shell" not in text and "bufsize" not in text  # never webdataset's raw Popen tuple


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_http_shards_read_fail_with_curl_meaning(exact_shards):
    shard, m = _first(exact_shards)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(exact_shards))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        got = [s["__key__"] for s in iter_shard(f"{base}/{shard.name}", m, m["shards"][0]["sha256"], 10)]
        assert got == [s["__key__"] for s in iter_shard(str(shard), m, None)]
        with pytest.raises(DataError, match=r"exited with status 22 \(curl: the server answered with an HTTP error"):
            list(iter_shard(f"{base}/missing.tar", m, None, 10))
    finally:
        srv.shutdown()
        srv.server_close()
    with pytest.raises(DataError, match=r"exited with status 7 \(curl: could not connect to the server\)"):
        list(iter_shard(f"{base}/{shard.name}", m, None, 10))  # the server is gone


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_command_process_survives_a_killed_reader(exact_shards, sig):
    shard, _ = _first(exact_shards)
    marker = f"sleep 62.{int(sig)}"
    code = ("import sys; from wsra_dist.data.shards import iter_shard, load_manifest; "
            f"m = load_manifest({str(exact_shards)!r}); "
            f"list(iter_shard({f'pipe:head -c 3000 {shard}; {marker}'!r}, m, None, 300))")
    p = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        end = time.time() + 60
        while not _procs(marker) and time.time() < end:
            time.sleep(0.1)
        assert _procs(marker), "the command did not start"
        p.send_signal(sig)
        p.wait(timeout=30)
        assert _gone(marker), _procs(marker)
    finally:
        p.kill()


def test_training_on_a_stalled_source_fails_in_one_line(exact_shards, tmp_path):
    pattern = str(exact_shards / "shard-{000000..000005}.tar")
    ov = _overrides(exact_shards, tmp_path / "run", 16, 2, "sgd",
                    [f"data.train_manifest={exact_shards / 'manifest.json'}", "data.read_timeout_s=2"])
    ov[0] = f"data.train_shards=pipe:head -c 5000 {pattern}; sleep 61.75"
    t = time.time()
    p = run_checked([sys.executable, "-m", "wsra_dist.train", str(RECIPE), *ov], check=False)
    assert p.returncode == 2 and time.time() - t < 90
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "no data for 2 s (data.read_timeout_s)" in lines[0] and "shard-000000.tar" in lines[0]
    assert _gone("sleep 61.75")

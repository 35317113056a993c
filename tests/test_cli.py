"""The command line: complete --help for every command, the shard/verify contract, fast start."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["synth", "shard", "shard didemo", "shard charades", "shard activitynet", "verify", "train", "evaluate", "demo", "ablate", "ground", "features"]


def cli(*args, check=True):
    return run_cli(*args, check=check, env={"COLUMNS": "200"})


def test_top_level_help_lists_every_command():
    t = time.time()
    out = cli("--help").stdout
    assert time.time() - t < 10
    for c in ("synth", "shard", "verify", "train", "evaluate", "demo", "ablate", "ground", "features"):
        assert f" {c} " in out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd):
    out = cli(*cmd.split(), "--help").stdout
    assert "Usage" in out and len(out) > 300


def test_shard_contract_flags_and_verify(planted_didemo, tmp_path):
    data = planted_didemo / "data"
    out = tmp_path / "s"
    cli("shard", "didemo", "--annotations", data / "val_data.json", "--features", data / "average_global_flow.h5",
        "--out", out, "--shard-size", "7", "--quiet", "--cache-dir", planted_didemo / "cache")
    assert len(list(out.glob("shard-*.tar"))) >= 2
    assert "all shards match" in cli("verify", out).stdout
    (out / "shard-000001.tar").write_bytes(b"garbage")
    p = cli("verify", out, check=False)
    assert p.returncode == 1 and "shard-000001.tar" in p.stderr + p.stdout


def test_quiet_shard_prints_no_progress_bar_at_all(planted_didemo, tmp_path):
    """--quiet silences every bar (HF's "Loading weights" and datasets' map included); without it the only
    bars are this tool's (no tqdm)."""
    data = planted_didemo / "data"
    args = ["shard", "didemo", "--annotations", data / "val_data.json", "--features", data / "average_global_flow.h5",
            "--shard-size", "7", "--cache-dir", tmp_path / "cache"]  # a fresh cache: the text is encoded here
    quiet = cli(*args, "--out", tmp_path / "q", "--quiet")
    assert quiet.stderr.strip() == "", quiet.stderr
    loud = cli(*args, "--out", tmp_path / "l")
    assert "encoding queries" in loud.stderr + loud.stdout
    assert "Loading weights" not in loud.stderr and "it/s]" not in loud.stderr  # no tqdm


def test_version_choices_and_unwrapped_help():
    from wsra_dist import __version__, cli as C
    from wsra_dist.data.text import POOLINGS
    from wsra_dist.evaluation.runner import PROTOCOLS

    assert cli("--version").stdout.strip() == f"wsra-dist {__version__}"
    # the CLI's choices are the library's (listed in --help, checked by click)
    assert tuple(m.value for m in C.Protocol) == PROTOCOLS and tuple(m.value for m in C.Pooling) == POOLINGS
    ev = cli("evaluate", "--help").stdout
    assert "<didemo|charades|activitynet>" in ev and "<clamp|strict>" in ev
    assert "<losses|k|model>" in cli("ablate", "--help").stdout
    sd = cli("shard", "didemo", "--help").stdout
    assert "<layers_mean|last_mean|embed_layers_mean|cls>" in sd
    assert "[s/6, e/6]" in sd  # not eaten as markup
    # piped (stdout is not a terminal): one line per option, whatever COLUMNS says
    line = next(l for l in sd.splitlines() if l.lstrip().startswith("--features"))
    assert "(modalities are concatenated)" in line and len(line) > 120
    p = subprocess.run([sys.executable, "-m", "wsra_dist.cli", "evaluate", "--protocol", "trecvid", "--out", "x"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode != 0 and "didemo" in p.stderr and "charades" in p.stderr


def test_charades_shard_contract_flags(planted_charades, tmp_path):
    data = planted_charades / "data"
    p = cli("shard", "charades", "--annotations", data / "charades_sta_test.txt", "--durations",
            data / "Charades_v1_test.csv", "--features", data / "features", "--out", tmp_path / "c",
            "--charades-filter", "strict", "--shard-size", "5", "--quiet", "--cache-dir", planted_charades / "cache")
    assert "'charades_filter': 'strict'" in p.stdout


def test_bad_input_is_a_clear_error(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    p = cli("shard", "didemo", "--annotations", tmp_path / "a.json", "--features", tmp_path / "x.h5",
            "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "a.json" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


def test_train_wrapper_with_contract_overrides(planted_didemo, tmp_path):
    out = tmp_path / "run"
    cli("train", ROOT / "recipes" / "planted_didemo.yaml", f"data.train_shards={planted_didemo / 'shards' / 'train'}",
        "data.val_shards=", "data.test_shards=", "train.max_steps=1", "train.batch_size=8", "optim.name=sgd",
        "data.shuffle=false", "data.num_workers=0", "seed=0", f"output_dir={out}", "loss.k_top=1", "loss.k_last=1")
    assert (out / "model.safetensors").is_file() and (out / "recipe.yaml").is_file()
    p = cli("train", ROOT / "recipes" / "planted_didemo.yaml", "train.max_stepz=1", check=False)
    assert p.returncode == 2 and "unknown recipe key 'train.max_stepz'" in p.stderr


def test_ablate_k_grid_writes_table_and_plot(planted_didemo, tmp_path):
    out = tmp_path / "abl"
    p = cli("ablate", ROOT / "recipes" / "planted_didemo.yaml", "--study", "k", "--out", out, "--k-top", "1,2",
            "--k-last", "0", "--seeds", "2", f"data.train_shards={planted_didemo / 'shards' / 'train'}",
            f"data.val_shards={planted_didemo / 'shards' / 'val'}", "train.max_steps=2", "train.batch_size=16")
    assert "| 1 | 0 |" in p.stdout and "| 2 | 0 |" in p.stdout
    assert (out / "k_study.png").read_bytes()[:4] == b"\x89PNG" and (out / "table.md").is_file()
    results = __import__("json").loads((out / "results.json").read_text())
    assert [(r["k_top"], r["k_last"]) for r in results] == [(1, 0), (2, 0)] and all("R@1" in r for r in results)
    # two seeds per setting: mean ± sd, the runs themselves, and a verdict on the spread
    assert all(r["seeds"] == [0, 1] and len(r["runs"]) == 2 and r["R@1"] == sum(x["R@1"] for x in r["runs"]) / 2
               for r in results)
    assert " ± " in p.stdout and ("within the spread" in p.stdout or "beyond the spread" in p.stdout)
    # the prior baseline (training annotations, scored on the validation queries) sits in the same table
    assert "| Prior: moment frequency (uses training timestamps; baseline) | |" in p.stdout and "baseline (no video)" in p.stdout


def test_spread_rule_and_y_range():
    from wsra_dist.ablate import _y_range, exceeds_spread

    a = {"R@1": 60.0, "R@1 sd": 1.0, "seeds": [0, 1, 2]}
    assert not exceeds_spread(a, {"R@1": 61.0, "R@1 sd": 1.0, "seeds": [0, 1, 2]}, "R@1")  # 1.0 < 2 * 0.82
    assert exceeds_spread(a, {"R@1": 62.0, "R@1 sd": 1.0, "seeds": [0, 1, 2]}, "R@1")  # 2.0 > 1.63
    assert not exceeds_spread({**a, "seeds": [0]}, {"R@1": 90.0, "R@1 sd": 0.0, "seeds": [0]}, "R@1")  # 1 seed: unknown
    lo, hi = _y_range(60.0, 60.5)
    assert hi - lo >= 10  # a 0.5-point difference is not drawn as a cliff

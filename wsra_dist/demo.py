"""The embedded default: planted DiDeMo benchmark -> shards -> training -> evaluation table."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "planted_didemo.yaml"


def _recipe_path() -> Path:
    if RECIPE.is_file():
        return RECIPE
    raise FileNotFoundError(f"{RECIPE}: the planted_didemo recipe ships with the repository (recipes/)")


def run_demo(out: str | Path, videos: int = 1200, epochs: int = 6, seed: int = 0) -> str:
    from rich.console import Console

    from .config import load_recipe
    from .data.pack import shard_didemo
    from .data.synthetic import synth
    from .evaluation.reference import benchmark_reference_rows
    from .evaluation.runner import evaluate_checkpoints
    from .train import train

    con = Console(stderr=True)
    out = Path(out)
    t0 = time.time()
    con.rule("1/4 planted DiDeMo benchmark (official formats)")
    synth("didemo", out / "data", videos, seed)
    for row, vals in benchmark_reference_rows(out / "data", "didemo").items():
        con.print(f"  {row:12s} " + "  ".join(f"{k} {v:.2f}" for k, v in vals.items()))
    con.rule("2/4 shards (MiniLM query features)")
    for split in ("train", "val", "test"):
        m = shard_didemo(out / "data" / f"{split}_data.json", [str(out / "data" / "average_global_flow.h5")],
                         out / "shards" / split, shard_size=100, progress=True)
        con.print(f"  {split}: {m['num_queries']} queries, {m['num_videos']} videos, {len(m['shards'])} shards")
    con.rule("3/4 training (recipes/planted_didemo.yaml)")
    recipe = load_recipe(_recipe_path(), [
        f"data.train_shards={out / 'shards' / 'train'}", f"data.val_shards={out / 'shards' / 'val'}",
        "data.test_shards=", f"output_dir={out / 'run'}", "overwrite=true", f"train.epochs={epochs}", f"seed={seed}",
    ])
    run_dir = train(recipe)
    con.rule("4/4 evaluation (official DiDeMo protocol, test split)")
    _, md = evaluate_checkpoints([str(run_dir)], [str(out / "shards" / "test")], "didemo", out / "results",
                                 run_name="WSRA + cross-video variant (this toolkit, planted data)")
    con.rule("+ video-corpus moment retrieval (every test query against every test video) and a search index")
    from .corpus.index import build_index
    from .corpus.protocol import evaluate_corpus
    from .evaluation.priors import training_from_shards

    _, corpus_md = evaluate_corpus(str(run_dir), str(out / "shards" / "test"), out / "results" / "corpus",
                                   train=training_from_shards(str(out / "shards" / "train"), "didemo"))
    con.print(corpus_md, markup=False, highlight=False, soft_wrap=True)
    if (out / "index" / "index.json").is_file():  # the previous demo's index: its model was just retrained
        shutil.rmtree(out / "index")
    index = build_index(run_dir, [str(out / "shards" / "test")], out / "index")
    con.print(f"corpus table: {out / 'results' / 'corpus' / 'table.md'}; search page: "
              f"wsra-dist serve {index} --port 8000   (then open http://127.0.0.1:8000/)", markup=False)
    con.print(f"demo finished in {time.time() - t0:.0f} s")
    return md or ""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def planted_didemo(tmp_path_factory):
    from .helpers import make_planted_didemo

    return make_planted_didemo(tmp_path_factory.mktemp("planted_didemo"))


@pytest.fixture(scope="session")
def planted_charades(tmp_path_factory):
    from .helpers import make_planted_charades

    return make_planted_charades(tmp_path_factory.mktemp("planted_charades"))


@pytest.fixture(scope="session")
def trained_didemo(tmp_path_factory):
    """A checkpoint trained on a planted DiDeMo set (400 videos, 3 epochs, the recipe's variant)."""
    from pathlib import Path

    from wsra_dist.config import load_recipe
    from wsra_dist.train import train

    from .helpers import make_planted_didemo

    root = make_planted_didemo(tmp_path_factory.mktemp("trained_didemo"), videos=400, shard_size=50, seed=1)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "planted_didemo.yaml"
    r = load_recipe(recipe, [f"data.train_shards={root / 'shards' / 'train'}", "data.val_shards=", "data.test_shards=",
                             "train.epochs=3", f"output_dir={root / 'run'}", "train.progress=false"])
    train(r)
    return root



@pytest.fixture(scope="session")
def corpus_run(trained_didemo, tmp_path_factory):
    """evaluate --corpus of the trained DiDeMo checkpoint on its test split, with the prior of its training split:
    (root, out folder, metrics, table)."""
    from wsra_dist.corpus.protocol import evaluate_corpus
    from wsra_dist.evaluation.priors import training_from_shards

    out = tmp_path_factory.mktemp("corpus")
    train = training_from_shards(str(trained_didemo / "shards" / "train"), "didemo")
    res, md = evaluate_corpus(str(trained_didemo / "run"), str(trained_didemo / "shards" / "test"), out, train=train)
    return trained_didemo, out, res, md

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

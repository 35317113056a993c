"""WSRA.save_pretrained / from_pretrained: config + model.safetensors with a format version; loadable from a
save_pretrained folder, a training run folder and a checkpoint folder, giving the same scores."""

from __future__ import annotations

import json

import pytest
import torch

from wsra_dist.model import MODEL_FORMAT, WSRA


def _scores(model: WSRA, info: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    video = torch.randn(2, 6, sum(info["layout"]["modalities"]), generator=g)  # DiDeMo chunks
    text = torch.randn(2, info["dims"]["text"], generator=g)
    with torch.no_grad():
        return model.candidate_scores(video, text)


def test_round_trip_from_run_checkpoint_and_saved_folder(trained_didemo, tmp_path):
    from safetensors import safe_open

    run = WSRA.from_pretrained(trained_didemo / "run")
    assert not run.training and run.info["layout"]["kind"] == "didemo_chunks"
    ref = _scores(run, run.info)
    saved = run.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((saved / "config.json").read_text())["format"] == MODEL_FORMAT
    with safe_open(str(saved / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == MODEL_FORMAT
    again = WSRA.from_pretrained(saved)
    torch.testing.assert_close(_scores(again, again.info), ref, rtol=0, atol=0)
    ckpts = sorted((trained_didemo / "run" / "checkpoints").glob("step-*"))
    assert ckpts, "the trained fixture keeps checkpoints"
    last = WSRA.from_pretrained(ckpts[-1])  # a checkpoint folder of the same run: the final weights here
    assert _scores(last, last.info).shape == ref.shape
    for k, v in run.state_dict().items():  # the run folder's weights are the last checkpoint's
        torch.testing.assert_close(last.state_dict()[k], v)


def test_refusals_name_the_problem(trained_didemo, tmp_path):
    with pytest.raises(FileNotFoundError, match="needs model.safetensors and config.json"):
        WSRA.from_pretrained(tmp_path)
    saved = WSRA.from_pretrained(trained_didemo / "run").save_pretrained(tmp_path / "m")
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**cfg, "format": "wsra-dist-model/99"}))
    with pytest.raises(ValueError, match="newer than this wsra-dist reads"):
        WSRA.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "model"}))
    with pytest.raises(ValueError, match="incomplete model config"):
        WSRA.from_pretrained(saved)
    with pytest.raises(ValueError, match="needs the model's config"):
        WSRA.from_info(cfg).__class__(WSRA.from_info(cfg).cfg).save_pretrained(tmp_path / "x")


def test_config_of_another_model_beside_the_weights_is_one_clear_error(trained_didemo, tmp_path):
    saved = WSRA.from_pretrained(trained_didemo / "run").save_pretrained(tmp_path / "m")
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model"]["hidden"] = int(cfg["model"]["hidden"]) * 2  # a config edited or copied from a wider run
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor .* but config\.json describes .*different models"):
        WSRA.from_pretrained(saved)

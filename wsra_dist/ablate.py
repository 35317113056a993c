"""The paper's ablations on any recipe (planted DiDeMo by default): Table 1 (loss terms) and Figure 6 (K)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import load_recipe

# Table 1: L_video, L_snippet, L_batch on/off (literal objective: the cross-video variant is off).
LOSS_STUDY = [
    ("L_video", {"loss.w_video": 0.1, "loss.w_snippet": 0, "loss.w_batch": 0}),
    ("L_snippet", {"loss.w_video": 0, "loss.w_snippet": 1, "loss.w_batch": 0}),
    ("L_video + L_snippet", {"loss.w_video": 0.1, "loss.w_snippet": 1, "loss.w_batch": 0}),
    ("L_video + L_snippet + L_batch", {"loss.w_video": 0.1, "loss.w_snippet": 1, "loss.w_batch": 0.1}),
]


def ensure_planted(recipe_path: Path, overrides: list[str], root: Path) -> list[str]:
    """If the recipe's shards do not exist and it is a planted recipe, write them (synth + shard) under root."""
    r = load_recipe(recipe_path, overrides)
    if Path(r.data.train_shards, "manifest.json").is_file() or not r.name.startswith("planted_"):
        return overrides
    from .data.pack import shard_charades, shard_didemo
    from .data.synthetic import synth

    profile = "didemo" if "didemo" in r.name else "charades"
    data = root / "data"
    synth(profile, data, None, r.seed)
    splits = {}
    if profile == "didemo":
        for s in ("train", "val"):
            shard_didemo(data / f"{s}_data.json", [str(data / "average_global_flow.h5")], root / "shards" / s, 500)
            splits[s] = root / "shards" / s
    else:
        for s in ("train", "test"):
            shard_charades(data / f"charades_sta_{s}.txt", data / f"Charades_v1_{s}.csv", data / "features",
                           root / "shards" / s, 500)
        splits = {"train": root / "shards" / "train", "val": root / "shards" / "test"}
    return [f"data.train_shards={splits['train']}", f"data.val_shards={splits['val']}", *overrides]


def _run(recipe_path: Path, overrides: list[str], out: Path) -> dict:
    from .train import train

    r = load_recipe(recipe_path, overrides)
    # Score on the validation split at the end, as Table 1 and Figure 6 do.
    r.data.test_shards, r.data.val_shards = r.data.val_shards, ""
    r.output_dir = str(out)
    r.train.progress = False
    train(r)
    return json.loads((out / "history.json").read_text())["test"]


def run_ablation(recipe_path: Path, study: str, out: Path, overrides: list[str],
                 k_top: tuple[int, ...] = (1, 2, 3, 4), k_last: tuple[int, ...] = (0, 2, 4)) -> str:
    out.mkdir(parents=True, exist_ok=True)
    overrides = ensure_planted(Path(recipe_path), overrides, out)
    results = []
    if study == "losses":
        for name, ov in LOSS_STUDY:
            extra = [f"{k}={v}" for k, v in ov.items()] + ["loss.w_cross=0"]
            m = _run(recipe_path, overrides + extra, out / "runs" / name.replace(" + ", "+").replace(" ", ""))
            results.append({"losses": name, **m})
        base = load_recipe(recipe_path, overrides)
        if base.loss.w_cross:
            m = _run(recipe_path, overrides, out / "runs" / "recipe_with_variant")
            results.append({"losses": f"recipe as given (with cross-video variant, w_cross={base.loss.w_cross})", **m})
        keys = [k for k in results[0] if k != "losses"]
        lines = ["| losses | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        lines += [f"| {r['losses']} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |" for r in results]
    elif study == "k":
        for kt in k_top:
            for kl in k_last:
                m = _run(recipe_path, overrides + [f"loss.k_top={kt}", f"loss.k_last={kl}"], out / "runs" / f"k{kt}_{kl}")
                results.append({"k_top": kt, "k_last": kl, **m})
        keys = [k for k in results[0] if k not in ("k_top", "k_last")]
        lines = ["| K_top | K_last | " + " | ".join(keys) + " |", "|---:|---:|" + "---:|" * len(keys)]
        lines += [f"| {r['k_top']} | {r['k_last']} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |" for r in results]
        _plot_k(results, out / "k_study.png")
    else:
        raise ValueError(f"--study must be losses or k, got {study!r}")
    md = f"Ablation `{study}` on {recipe_path} (validation split)\n\n" + "\n".join(lines) + "\n"
    (out / "results.json").write_text(json.dumps(results, indent=1))
    tmp = out / ".table.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, out / "table.md")
    return md


def _plot_k(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "R@1" if "R@1" in results[0] else "R@1,IoU=0.7"
    fig, ax = plt.subplots(figsize=(6, 4))
    for kl in sorted({r["k_last"] for r in results}):
        rs = sorted((r for r in results if r["k_last"] == kl), key=lambda r: r["k_top"])
        ax.plot([r["k_top"] for r in rs], [r[key] for r in rs], marker="o", label=f"K_last = {kl}")
    ax.set_xticks(sorted({r["k_top"] for r in results}))
    ax.set_xlabel("K_top")
    ax.set_ylabel(f"{key} (%)")
    ax.set_title("Top/last-K sampling (Figure 6 protocol)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

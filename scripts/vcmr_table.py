"""Aggregate `evaluate --corpus` metrics.json files of several seeds into one markdown table (mean ± sd).

    python scripts/vcmr_table.py "LABEL=runs/vcmr/dd_best_s*" ["LABEL2=GLOB2" ...]

Chance and prior rows come from the first file (they do not depend on the seed); the model and oracle-video rows
are mean ± sd over the files of each glob.  Prints the ratio of the model's R@10 at IoU 0.5 to chance and prior.
"""

from __future__ import annotations

import glob
import json
import statistics
import sys

KEYS = ["R@1,IoU=0.5", "R@10,IoU=0.5", "R@100,IoU=0.5", "R@1,IoU=0.7", "R@10,IoU=0.7", "video_R@1", "video_R@10"]


def row_of(rows: dict, prefix: str) -> str:
    return next(k for k in rows if k.startswith(prefix))


def main() -> None:
    print("| data, recipe | row | " + " | ".join(KEYS) + " |")
    print("|---|---|" + "---:|" * len(KEYS))
    for spec in sys.argv[1:]:
        label, pattern = spec.split("=", 1)
        ms = [json.load(open(f)) for f in sorted(glob.glob(pattern + "/metrics.json"))]
        if not ms:
            sys.exit(f"no metrics.json under {pattern}")
        first = ms[0]["rows"]
        for name in ("Chance", "Prior"):
            r = first[row_of(first, name)]
            print(f"| {label} | {row_of(first, name)} | " + " | ".join(f"{r[k]:.2f}" for k in KEYS) + " |")
        for name in ("Oracle video", "WSRA"):
            vals = [m["rows"][row_of(m["rows"], name)] for m in ms]
            cells = []
            for k in KEYS:
                xs = [v[k] for v in vals]
                sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
                cells.append(f"{statistics.mean(xs):.2f} ± {sd:.2f}")
            print(f"| {label} ({len(ms)} seeds) | {row_of(ms[0]['rows'], name)} | " + " | ".join(cells) + " |")
        k = "R@10,IoU=0.5"
        model = statistics.mean(m["rows"][row_of(m["rows"], "WSRA")][k] for m in ms)
        ch, pr = first[row_of(first, "Chance")][k], first[row_of(first, "Prior")][k]
        print(f"| {label} | R@10,IoU=0.5 ratios | model / chance {model / ch:.1f}x, model / prior {model / pr:.1f}x "
              f"({ms[0]['queries']} queries, {ms[0]['videos']} videos, {ms[0]['candidates']} candidates) |"
              + " |" * (len(KEYS) - 1))


if __name__ == "__main__":
    main()

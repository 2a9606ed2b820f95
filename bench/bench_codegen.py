"""Generate + build time, weight bytes and arena bytes for the reference models (host, gcc -O2).

    .venv/bin/python bench/bench_codegen.py
"""
from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

import edgekit
from edgekit import models


def measure(name, model, shape):
    rng = np.random.default_rng(0)
    calib = rng.uniform(0, 1, (64,) + shape).astype(np.float32)
    t0 = time.perf_counter()
    graph = edgekit.quantize(model, calib)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        record = edgekit.generate(graph, tmp)
        t2 = time.perf_counter()
        built = edgekit.build(tmp)
        t3 = time.perf_counter()
    return {"model": name, "quantize_s": t1 - t0, "generate_s": t2 - t1, "build_s": t3 - t2,
            "float_weight_bytes": record["float_weight_bytes"], "weight_bytes": record["weight_bytes"],
            "arena_bytes": record["arena_bytes"], "arena_lower_bound": record["arena_lower_bound"],
            "text_bytes": built["sizes"]["text"]}


def main():
    rows = [measure("digits MLP 64-300-100-10", models.digits_mlp(), (64,)),
            measure("digits CNN (demo)", models.DigitsCNN(), (1, 8, 8)),
            measure("DS-CNN keyword spotting", models.ds_cnn_kws(), (1, 49, 10))]
    print(f"# codegen benchmark, {date.today()}, {platform.machine()} {platform.processor() or ''}, "
          f"python {platform.python_version()}")
    print("| model | quantize s | generate s | build s | float32 weights B | int8 weights B | arena B "
          "| arena lower bound B | host text B |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['quantize_s']:.2f} | {r['generate_s']:.2f} | {r['build_s']:.2f} | "
              f"{r['float_weight_bytes']:,} | {r['weight_bytes']:,} | {r['arena_bytes']:,} | "
              f"{r['arena_lower_bound']:,} | {r['text_bytes']:,} |")
    if "--json" in sys.argv:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

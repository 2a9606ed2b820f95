"""Early exits on the emulated Cortex-M4: the demo CNN with exits after conv1 and conv2.

    .venv/bin/python bench/bench_exits.py [--board mps2-an386] [--json out.json]

Digits' training split is split again (80/20, stratified, seed 0): the backbone and the exit heads train
on the first part; the threshold is chosen on the second (validation) part, as the operating point that
loses at most 1 pp against the full network there, with the work per layer measured on the device; every
number reported is measured on the held-out test split (360 images) from the device's own outputs
(each checked bit for bit against the numpy reference, exit index included). The original single-exit
CNN runs on the same emulator in the same run as the baseline.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import edgekit
from edgekit import datasets, models, train
from edgekit.compress import exits as ex
from edgekit.device.emulator import Emulator
from edgekit.device.flash import flash_project
from edgekit.device.profile import choose_threshold, profile, sweep_device, sweep_reference
from edgekit.device.protocol import DeviceLink


DEVICE_THRESHOLDS = [0.5, 0.8, 0.95]  # also measured on the device, every test image at each


def splits():
    from sklearn.model_selection import train_test_split

    d = datasets.digits()
    x_tr, x_val, y_tr, y_val = train_test_split(d.x_train, d.y_train, test_size=0.2, stratify=d.y_train,
                                                random_state=0)
    return d, datasets.Split(x_tr, y_tr, x_val, y_val, "digits-train")


def deploy(graph, out: Path, board: str, url: str, exit_threshold=0.9):
    record = edgekit.generate(graph, out, board=board, exit_threshold=exit_threshold)
    built = edgekit.build(out)
    flash_project(out, url, show_progress=False)
    return record, built


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--board", default="mps2-an386")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--max-drop", type=float, default=0.01)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    d, fit = splits()
    cnn = train.train_classifier(models.DigitsCNN(), fit.x_train, fit.y_train, epochs=args.epochs,
                                 show_progress=False)
    calib = fit.x_train[:200]
    variants = {
        "frozen backbone, distilled heads": dict(mode="frozen"),
        "joint training (weights 1, 1, 1)": dict(mode="joint", epochs=20),
    }
    results = {"date": str(date.today()), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
               "board": args.board, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp, Emulator(args.board) as emu:
        tmp = Path(tmp)
        # the baseline: the plain CNN, as trained
        base_q = edgekit.quantize(cnn, calib)
        base_record, base_built = deploy(base_q, tmp / "base", args.board, emu.url)
        base = profile(emu.url, d.x_test, project_dir=tmp / "base", labels=d.y_test, show_progress=False)
        assert base["bit_exact"]
        results["baseline"] = {"accuracy": base["accuracy"], "instructions": base["total"]["median"],
                               "flash": base_built["sizes"]["flash"], "arena": base_record["arena_bytes"]}
        with DeviceLink(emu.url) as link:
            link.reset()
        for name, options in variants.items():
            multi = ex.add_exits(cnn, ["conv1", "conv2"], fit, show_progress=False, **options)
            q = edgekit.quantize(multi, calib)
            out = tmp / name.split()[0]
            record, built = deploy(q, out, args.board, emu.url)
            # per-layer work on the device (largest count per layer over a few inputs, heads included)
            # (threshold 1.0: no exit ever answers, so every head and every backbone layer runs)
            probe = profile(emu.url, fit.x_test[:20], project_dir=out, exit_threshold=1.0, full_network=False,
                            show_progress=False)
            layer_costs = {l["index"]: l["max"] for l in probe["layers"]}
            val = sweep_reference(out, fit.x_test, fit.y_test, costs=layer_costs)
            chosen = choose_threshold(val, args.max_drop)
            report = profile(emu.url, d.x_test, project_dir=out, labels=d.y_test, show_progress=False,
                             exit_threshold=chosen["threshold"] if chosen["threshold"] is not None else "off")
            assert report["bit_exact"], report["mismatches"]
            table = sorted({0.5, 0.7, 0.8, 0.9, 0.95, 0.99} | ({chosen["threshold"]} - {None}))
            curve = sweep_reference(out, d.x_test, d.y_test, table, costs=layer_costs)
            measured = sweep_device(emu.url, d.x_test, d.y_test, DEVICE_THRESHOLDS, project_dir=out,
                                    show_progress=False)
            assert measured["bit_exact"]
            with DeviceLink(emu.url) as link:
                link.reset()
            e = report["exits"]
            results["variants"][name] = {
                "threshold": chosen["threshold"], "threshold_raw": chosen["threshold_raw"],
                "validation": {"accuracy": chosen["accuracy"], "full_accuracy": val["full"]["accuracy"],
                               "work_fraction": chosen["work_fraction"]},
                "accuracy": e["accuracy"], "full_accuracy": e["full_accuracy"],
                "mean_instructions": e["mean_count"], "full_instructions": e["full_mean_count"],
                "work_fraction": e["work_fraction"],
                "vs_baseline": e["mean_count"] / results["baseline"]["instructions"],
                "per_exit": e["per_exit"], "flash": built["sizes"]["flash"], "arena": record["arena_bytes"],
                "curve": curve, "device_points": measured["points"], "device_full": measured["full"],
            }
    results["seconds"] = time.time() - started
    print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float) + "\n")


def print_tables(r: dict) -> None:
    b = r["baseline"]
    print(f"## Early exits (issue 6), {r['date']}, {r['machine']}, {r['board']} (QEMU -icount), "
          f"{r['seconds']:.0f} s\n")
    print("| model | threshold (chosen on validation) | accuracy (device, test) | full network accuracy | "
          "instructions / inference | full network | work fraction | vs plain CNN | flash B | arena B |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| plain demo CNN | - | {b['accuracy'] * 100:.2f} % | - | {b['instructions']:,.0f} | - | - | 1.000 | "
          f"{b['flash']:,} | {b['arena']:,} |")
    for name, v in r["variants"].items():
        thr = "off" if v["threshold"] is None else f"{v['threshold']:.4g} ({v['threshold_raw']}/256)"
        print(f"| exits conv1, conv2: {name} | {thr} | {v['accuracy'] * 100:.2f} % | {v['full_accuracy'] * 100:.2f} % "
              f"| {v['mean_instructions']:,.0f} | {v['full_instructions']:,.0f} | **{v['work_fraction']:.3f}** | "
              f"{v['vs_baseline']:.3f} | {v['flash']:,} | {v['arena']:,} |")
    for name, v in r["variants"].items():
        print(f"\n{name}: per exit at the chosen threshold (test split, device)\n")
        print("| exit | answers | share | accuracy of its answers | mean instructions |")
        print("|---|---|---|---|---|")
        for row in v["per_exit"]:
            acc = "-" if row.get("accuracy") is None else f"{row['accuracy'] * 100:.2f} %"
            mean = "-" if row["mean_count"] is None else f"{row['mean_count']:,.0f}"
            print(f"| {row['name']} | {row['hits']} | {row['hit_rate'] * 100:.1f} % | {acc} | {mean} |")
        print(f"\n{name}: threshold curve (test split; reference with the device's per-layer counts, "
              "and measured on the device)\n")
        print("| threshold | accuracy | work fraction (reference) | work fraction (device) | exit shares |")
        print("|---|---|---|---|---|")
        device = {p["threshold_raw"]: p for p in v["device_points"]}
        for p in v["curve"]["points"] + [v["curve"]["full"]]:
            thr = "off" if p["threshold"] is None else f"{p['threshold']:.4g}"
            if p["threshold_raw"] == v["threshold_raw"]:
                thr += " (chosen)"
            dev = device.get(p["threshold_raw"])
            dev_frac = f"{dev['work_fraction']:.3f}" if dev else ("1.000" if p["threshold"] is None else "")
            shares = " / ".join(f"{h * 100:.1f}" for h in p["hit_rates"])
            print(f"| {thr} | {p['accuracy'] * 100:.2f} % | {p['work_fraction']:.3f} | {dev_frac} | {shares} % |")


if __name__ == "__main__":
    main()

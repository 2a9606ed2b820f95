"""The `edgekit` command."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from .errors import EdgekitError
from .safety import byte_size, non_negative_float, percentile_arg, positive_float, positive_int, tcp_port


def _load_npy(path: str, what: str) -> np.ndarray:
    p = Path(path)
    if not p.exists():
        raise EdgekitError(f"{what} file not found: {p}")
    if not p.is_file():
        raise EdgekitError(f"{what} {p} is not a file")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise EdgekitError(f"{what} file {p} is not a readable .npy array: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(arr, np.ndarray):
        raise EdgekitError(f"{what} file {p} is an .npz archive; give one array (.npy)")
    return arr


def cmd_generate(args) -> int:
    from . import api
    from .boards import resolve_board

    from .codegen.output_dir import check_output_dir

    board = resolve_board(args.board)  # fail early on a typo
    check_output_dir(args.output, force=args.force)  # and on an output it must not write, before any work
    from .safety import check_exit_threshold
    check_exit_threshold(args.exit_threshold, args.exit_criterion)
    if board.source is not None:
        print(f"using a board file of your own: {board.source} (board {board.name!r}, kind {board.kind}); "
              "its compiler and flags are what the build runs")
    model = Path(args.model)
    if not model.exists():
        raise EdgekitError(f"model file not found: {model}")
    graph = api.load(model)
    if graph.is_quantized() and args.weight_only:
        raise EdgekitError(f"--weight-only applies to float models; {model} is already int8: generate it "
                           "without --weight-only")
    if not (graph.is_quantized() or graph.meta.get("weight_only")):
        if args.calib is None and not args.weight_only:
            raise EdgekitError("a float model needs calibration data: --calib samples.npy "
                               "(float32, the model's own layout, batched on axis 0)")
        calib = _load_npy(args.calib, "calibration") if args.calib else None
        if args.weight_only and calib is None:
            from .passes.fuse import prepare_float
            from .passes.quantize import quantize_weights_only
            graph = quantize_weights_only(prepare_float(graph))
        else:
            graph = api.quantize(graph, calib, observer=args.observer, percentile=args.percentile,
                                 weight_only=args.weight_only, show_progress=True, exit_criterion=args.exit_criterion)
    example = _load_npy(args.calib, "calibration")[:1] if args.library and args.calib else None
    record = api.generate(graph, args.output, board=args.board, weights=args.weights,
                          exit_threshold=args.exit_threshold, force=args.force, library=args.library,
                          example_input=example, memory_off=[t for t in (args.memory_off or "").split(",") if t],
                          threads=args.threads)
    print(f"generated {'the library ' if args.library else ''}{args.output}: {len(record['layers'])} layers, "
          f"{record['mode']}, weights {record['weight_bytes']:,} B, arena {record['arena_bytes']:,} B, "
          f"board {record['board']}")
    for note in record.get("notes", []):
        print(f"note: {note}")
    mem = record["memory"]
    saved = ", ".join(f"{t} {b:,} B" for t, b in mem["saved_bytes"].items() if b)
    print(f"arena {mem['arena_bytes']:,} B, lower bound for this schedule {mem['lower_bound']:,} B, "
          f"greedy plan {mem['greedy_arena_bytes']:,} B" + (f"; saved (each turned off alone): {saved}" if saved else ""))
    if mem.get("reordered_layers"):
        print(f"layers run in the memory plan's order: {' '.join(map(str, mem['schedule']))}")
    for blk in mem.get("banded_blocks", []):
        print(f"residual block, layers {blk['layers'][0]}-{blk['layers'][-1]}: in {blk['bands']} row bands of {blk['rows']} "
              f"rows ({blk['band_bytes']:,} B of band buffers, {blk['extra_macs']} extra MACs)")
    for blk in mem.get("not_banded", []):
        print(f"residual block, layers {blk['layers'][0]}-{blk['layers'][-1]}: runs whole ({blk['reason']})")
    if args.library:
        print(f"use it: add_subdirectory({args.output}) + target_link_libraries(app PRIVATE edgekit_model) in CMake, "
              "or as an Arduino / PlatformIO library, a Zephyr module, or include edgekit_model.mk; "
              "the API is src/edgekit_model.h")
    if "exits" in record:
        ex = record["exits"]
        if isinstance(ex["threshold"], list):
            thr = ", ".join("off" if t is None else f"{t:g} ({r}/256)"
                            for t, r in zip(ex["threshold_real"], ex["threshold"]))
        else:
            thr = "off" if ex["threshold_real"] is None else f"{ex['threshold_real']:g} ({ex['threshold']}/256)"
        print(f"early exits: {', '.join(ex['names'][:-1])}, then the final classifier; {ex['criterion']} "
              f"confidence, threshold {thr}")
    return 0


def _model_in_and_out(args) -> tuple[Path, Path]:
    """The input model and a distinct .pt2 output path for the commands that rewrite a model."""
    model_path, out_path = Path(args.model), Path(args.output)
    if out_path.suffix != ".pt2":
        raise EdgekitError(f"the output model {out_path} must be a .pt2 file (torch.export)")
    if out_path.exists() and out_path.resolve() == model_path.resolve():
        raise EdgekitError(f"the output {out_path} is the input model; choose another path (the input stays untouched)")
    from .safety import check_output_file
    check_output_file(out_path, "the output model")
    return model_path, out_path


def cmd_exits(args) -> int:
    from .compress import exits as ex

    model_path, out_path = _model_in_and_out(args)
    weights = None
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise EdgekitError(f"--weights takes comma-separated numbers, got {args.weights!r}") from None
    from .compress import fxgraph
    from .compress.data import as_split
    model, sample_shape = fxgraph.load_model(model_path)
    split = as_split(args.data)
    multi = ex.add_exits(model, args.after, split, mode=args.mode, epochs=args.epochs, pool=args.pool,
                         distill=not args.no_distill, weights=weights, sample_shape=sample_shape,
                         show_progress=not args.quiet)
    if args.calibrate:
        temperatures = ex.calibrate(multi, split)
        print("exit temperatures (fitted on the training split): " +
              ", ".join(f"{n} {t:.3g}" for n, t in zip(multi.edgekit_exits, temperatures)))
    tmp = out_path.with_name(out_path.name + ".partial")
    ex.save_model(multi, sample_shape, tmp)
    tmp.replace(out_path)
    report = ex.evaluate(multi, split)
    print(f"held-out accuracy of each exit (float, {report['samples']} samples):")
    for name, acc in zip(report["exits"], report["accuracy"]):
        print(f"  {name:24s} {acc * 100:6.2f} %")
    print("answers per exit at max-softmax thresholds (float; `edgekit thresholds` gives the int8 curve):")
    for row in report["curve"]:
        shares = ", ".join(f"{n} {h * 100:.0f} %" for n, h in zip(report["exits"], row["hit_rates"]))
        print(f"  {row['threshold']:5.2f}: accuracy {row['accuracy'] * 100:6.2f} %  ({shares})")
    print(f"wrote {out_path}")
    return 0


def cmd_thresholds(args) -> int:
    import json

    from .device.operating_point import describe_promise
    from .device.profile import (choose_threshold, describe_threshold, format_sweep, search_per_exit, sweep_device,
                                 sweep_path, sweep_reference)

    from .safety import check_labels, check_output_file
    if not 0.0 < args.confidence < 1.0:
        raise EdgekitError(f"--confidence must be between 0 and 1 (e.g. 0.95), got {args.confidence}")
    if not 0.0 < args.max_drop < 1.0:
        raise EdgekitError(f"--max-drop must be between 0 and 1 (e.g. 0.01 = 1 pp), got {args.max_drop}")
    if args.test_samples is not None and args.test_samples <= 0:
        raise EdgekitError(f"--test-samples must be a positive number of samples, got {args.test_samples}")
    if args.json:
        check_output_file(args.json, "--json")
    x = _load_npy(args.inputs, "inputs")
    y = check_labels(_load_npy(args.labels, "labels"), len(x) if x.ndim else 0)
    if args.html:
        from . import report as html_report
        html_report.check_output(args.html)
    thresholds = None
    if args.thresholds:
        thresholds = [t.strip() for t in args.thresholds.split(",") if t.strip()]
    if args.port:
        if not thresholds:
            raise EdgekitError("on a device, list the thresholds to measure: --thresholds 0.5,0.8,0.9")
        if args.per_exit:
            raise EdgekitError("--per-exit searches on the reference: give --project, not --port")
        sweep = sweep_device(args.port, x, y, thresholds, project_dir=args.project, int8=args.int8,
                             timeout=args.timeout)
    else:
        if not args.project:
            raise EdgekitError("give the generated project (--project DIR), or a device (--port)")
        costs = args.costs
        if costs != "macs":
            p = Path(costs)
            if not p.exists():
                raise EdgekitError(f"--costs: no such profile report {p} (or use 'macs')")
            try:
                costs = json.loads(p.read_text())
            except ValueError:
                raise EdgekitError(f"--costs: {p} is not a JSON profile report (edgekit profile --json)") from None
            if not isinstance(costs, dict) or "layers" not in costs:
                raise EdgekitError(f"--costs: {p} is not a profile report (edgekit profile --json)")
        if args.per_exit:
            if thresholds:
                raise EdgekitError("--per-exit searches its own thresholds: drop --thresholds")
            search = _load_npy(args.per_exit, "--per-exit search inputs")
            path = search_per_exit(args.project, search, costs=costs, int8=args.int8)
            sweep = sweep_path(args.project, x, y, path, costs=costs, int8=args.int8)
        else:
            sweep = sweep_reference(args.project, x, y, thresholds, costs=costs, int8=args.int8)
    chosen = choose_threshold(sweep, args.max_drop, args.confidence, args.test_samples)
    print(format_sweep(sweep, chosen))
    print()
    if chosen["promise"]["exits_off"]:
        print(f"operating point: exits off (the full network), accuracy {chosen['accuracy'] * 100:.2f} %")
    else:
        thr = describe_threshold(chosen["threshold"], chosen["threshold_raw"])
        print(f"operating point: threshold{'s' if isinstance(chosen['threshold'], list) else ''} {thr}, accuracy "
              f"{chosen['accuracy'] * 100:.2f} % (full network {sweep['full']['accuracy'] * 100:.2f} %), "
              f"work {chosen['work_fraction']:.3f} of the full network's")
    for line in describe_promise(chosen):
        print(line)
    if not chosen["promise"]["exits_off"]:
        raw = chosen["threshold_raw"]
        value = ",".join(f"{r / 256:.6g}" if r != 2147483647 else "off" for r in raw) if isinstance(raw, list) \
            else f"{raw / 256:.6g}"
        print(f"use it: edgekit generate ... --exit-threshold {value}  (or DeviceLink.set_exit_threshold("
              f"{raw}))")
    if args.json:
        Path(args.json).write_text(json.dumps({"sweep": sweep, "chosen": chosen}, indent=2, default=float) + "\n")
        print(f"wrote {args.json}")
    if args.html:
        html_report.write(html_report.thresholds_page(sweep, chosen, args.project), args.html)
        print(f"wrote {args.html}")
    if sweep.get("bit_exact") is False:
        print("edgekit: error: the device's outputs differ from the reference", file=sys.stderr)
        return 1
    return 0


def cmd_export(args) -> int:
    from . import api

    model = Path(args.model)
    if not model.exists():
        raise EdgekitError(f"model file not found: {model}")
    if Path(args.output).suffix != ".tflite":
        raise EdgekitError(f"the output must be a .tflite file, not {args.output}")
    from .safety import check_output_file
    check_output_file(args.output, "the output")
    graph = api.load(model)
    if not graph.is_quantized():
        if args.calib is None:
            raise EdgekitError("a float model needs calibration data: --calib samples.npy "
                               "(float32, the model's own layout, batched on axis 0)")
        graph = api.quantize(graph, _load_npy(args.calib, "calibration"), observer=args.observer,
                             percentile=args.percentile, show_progress=True)
    path = api.export_tflite(graph, args.output, io="int8" if args.int8_io else "float")
    print(f"wrote {path}: {len(graph.ops)} int8 ops, {path.stat().st_size:,} B, "
          f"{'int8' if args.int8_io else 'float'} inputs and outputs (NHWC)")
    return 0


def cmd_compress(args) -> int:
    import json
    import tempfile

    from .compress import fxgraph
    from .compress.recipe import load_recipe, run_recipe
    from .compress.report import table

    model_path, out_path = _model_in_and_out(args)
    if args.report and Path(args.report).resolve() in (model_path.resolve(), out_path.resolve()):
        raise EdgekitError("the report path must differ from the model paths")
    if args.html:
        from . import report as html_report
        html_report.check_output(args.html)  # before the training, not after
    if args.report:
        from .safety import check_output_file
        check_output_file(args.report, "--report")
    recipe = load_recipe(args.recipe)  # a bad recipe fails before any work
    if args.build_dir:
        from .codegen.output_dir import check_output_dir
        check_output_dir(args.build_dir)  # so does a build directory edgekit must not write into
    model, sample_shape = fxgraph.load_model(model_path)
    with tempfile.TemporaryDirectory() as scratch:
        # The final C project stays until the HTML report has drawn its memory plan and sections.
        build_dir = args.build_dir or (Path(scratch) / "c" if args.html else None)
        compressed, report = run_recipe(model, recipe, args.data, sample_shape=sample_shape, build_dir=build_dir,
                                        show_progress=not args.quiet)
        report["input"], report["output"], report["recipe"] = str(model_path), str(out_path), str(args.recipe)
        if args.html:
            html_report.write(html_report.compress_page(report), args.html)
    tmp = out_path.with_name(out_path.name + ".partial")
    fxgraph.export_model(compressed, sample_shape, tmp)
    tmp.replace(out_path)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"wrote {out_path}" + "".join(f" and {p}" for p in (args.report, args.html) if p))
    final = report.get("final")
    return 0 if final is None or final["c_equals_reference"] else 1


def cmd_tune(args) -> int:
    from .tune import pareto
    from .tune.search import run_search

    model_path = Path(args.model)
    if not model_path.is_file():
        raise EdgekitError(f"model file not found: {model_path}")
    summary = run_search(model_path, data=args.data, board=args.board, out_dir=args.output, trials=args.trials,
                         workers=args.workers, address=args.address, seed=args.seed, space=args.space,
                         max_flash=args.max_flash, max_ram=args.max_ram, max_drop=args.max_drop,
                         max_instructions=args.max_instructions, prefer=args.prefer, resume=args.resume,
                         profile_samples=args.profile_samples, quiet=args.quiet, batched=not args.unbatched)
    out = Path(args.output)
    rows = summary["trials"]
    trials, failed = pareto.counts(rows)
    print(f"\n{trials} trials ({failed} failed) in {summary['seconds']:.0f} s; input model: accuracy "
          f"{summary['baseline_accuracy'] * 100:.2f} % (float), weights {summary['float_weight_bytes']:,} B float32")
    print("Pareto front (accuracy from the C program on the held-out split; * = best within the constraints):")
    print(pareto.table(summary["front"], summary["baseline_accuracy"], summary["float_weight_bytes"],
                       summary["unit"].replace(" instructions", " instr"), summary["best"]))
    if summary["interrupted"]:
        print(f"edgekit: the search stopped after {trials} of {summary['requested_trials']} trials; continue it "
              f"with the same command and --resume", file=sys.stderr)
        return 130
    print(f"wrote {out / 'pareto.csv'}, {out / 'trials.csv'}"
          + (f", {out / 'pareto.png'}, {out / 'report.html'}" if (out / "report.html").exists() else ""))
    if summary["best"] is None:
        print("edgekit: error: " + pareto.no_fit_message(rows, summary["constraints"], summary["baseline_accuracy"]),
              file=sys.stderr)
        return 1
    print(f"best within the constraints: trial {summary['best']['number']} "
          f"({pareto.describe(summary['best']['config'])}); wrote {out / 'best.pt2'} and {out / 'best.toml'} "
          f"(edgekit compress MODEL --recipe {out / 'best.toml'} runs it again)")
    return 0


def _stack_arg(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise EdgekitError(f"--stack {value!r}: give a number of bytes, or auto") from None


def cmd_build(args) -> int:
    from . import api

    built = api.build(args.project, sanitize=args.sanitize, stack=_stack_arg(args.stack))
    sizes = built.get("sizes", {})
    print(f"built {built.get('binary')}: text {sizes.get('text', 0):,} B, data {sizes.get('data', 0):,} B, "
          f"bss {sizes.get('bss', 0):,} B")
    for line in built.get("budget_lines", []):
        print(line)
    return 0


def cmd_run(args) -> int:
    from . import api

    if args.output:
        from .safety import check_output_file
        check_output_file(args.output, "--output")
    x = _load_npy(args.inputs, "inputs")
    y, exit_index = api.run(args.project, x, int8=args.int8, sanitize=args.sanitize,
                            exit_threshold="project" if args.exit_threshold is None else args.exit_threshold,
                            with_exit=True)
    outs = y if isinstance(y, list) else [y]
    has_exits = "exits" in api.load_project(args.project)
    if args.output:
        if len(outs) == 1:
            np.save(args.output, outs[0])
        else:  # a multi-exit model: every exit's outputs and, as "exit", which one answered
            np.savez(args.output, *outs, **({"exit": exit_index} if has_exits else {}))
        print(f"wrote {len(outs[0])} outputs to {args.output}")
    else:
        for o in outs:
            print(o)
        if has_exits:
            print("answering exit per sample:", exit_index)
    return 0


def cmd_demo(args) -> int:
    from . import demo

    out = args.output or f"runs/demo-{args.board}"
    if args.board == "host":
        result = demo.run_host_demo(out, epochs=args.epochs)
    else:
        result = demo.run_device_demo(args.board, out, epochs=args.epochs, port=args.port)
    return 0 if result.get("bit_exact", False) else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_emulate(args) -> int:
    import signal
    import time

    from .device.emulator import Emulator

    # Installed explicitly: a shell's background job inherits SIGINT ignored, and SIGTERM (a CI
    # runner, systemd, kill) would otherwise end Python before it stops QEMU.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    emu = Emulator(args.board, port=args.port, log=Path(args.log) if args.log else None)
    emu.start()
    print(f"{emu.board.name} is running edgekit's serial bootloader in QEMU (pid {emu.process.pid}).\n"
          f"Its UART: {emu.url}\n"
          f"  edgekit flash OUT --port {emu.url}\n"
          f"  edgekit profile --port {emu.url} --inputs x.npy\n"
          "Ctrl-C stops it.", flush=True)
    try:
        while emu.alive():
            time.sleep(0.5)
        print(f"edgekit: QEMU exited (code {emu.process.returncode if emu.process else '?'})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        emu.stop()


def cmd_flash(args) -> int:
    from .device.flash import flash_project

    result = flash_project(args.project, args.port, method=args.method, start=not args.no_start,
                           mount=args.mount)
    if "blocks" in result:
        print(f"flashed {result['bytes']:,} bytes to chip 0x{result['chip_id']:04X}, verified"
              f"{', started' if result['started'] else ''} (model {result['fingerprint']})")
    else:
        print(f"flashed model {result['fingerprint']}: {result}")
    return 0


def cmd_profile(args) -> int:
    import json

    from .device.profile import format_report, profile
    from .safety import check_labels, check_output_file

    if args.json:
        check_output_file(args.json, "--json")
    x = _load_npy(args.inputs, "inputs")
    labels = _load_npy(args.labels, "labels") if args.labels else None
    if labels is not None:
        labels = check_labels(labels, len(x) if x.ndim else 0)
    if args.html:
        from . import report as html_report
        html_report.check_output(args.html)
    report = profile(args.port, x, project_dir=args.project, labels=labels, runs=args.runs, int8=args.int8,
                     timeout=args.timeout,
                     exit_threshold="project" if args.exit_threshold is None else args.exit_threshold,
                     full_network=not args.no_full)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    if args.html:
        html_report.write(html_report.profile_page(report), args.html)
        print(f"wrote {args.html}")
    if not report["bit_exact"]:
        print("edgekit: error: the device's outputs differ from the reference", file=sys.stderr)
        return 1
    return 0


def cmd_doctor(args) -> int:
    from .targets.toolchain import doctor

    ok, text = doctor()
    print(text)
    return 0 if ok else 1


def cmd_boards(args) -> int:
    from .boards import list_boards, load_board

    for name in list_boards():
        b = load_board(name)
        print(f"{name:16s} {b.kind:14s} {b.description}")
    return 0


def cmd_inspect(args) -> int:
    from . import api

    graph = api.load(args.model)
    print(graph.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgekit", description="Take a trained model to a microcontroller or a "
                                "Raspberry Pi, and measure it there.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="quantize a model and generate its C project")
    g.add_argument("model", help="a torch.export file (.pt2), an ONNX model (.onnx, float or QDQ) or an int8 .tflite")
    g.add_argument("--calib", help="calibration samples (.npy, float32, the model's layout, batched)")
    g.add_argument("--board", default="host", help="target board (see `edgekit boards`)")
    g.add_argument("-o", "--output", required=True, help="project directory to write: new, empty, or an edgekit "
                   "project (replaced; files edgekit did not generate are kept)")
    g.add_argument("--force", action="store_true", help="also overwrite generated files you edited in the project")
    g.add_argument("--observer", default="minmax", choices=["minmax", "percentile"])
    g.add_argument("--percentile", type=percentile_arg, default=99.99)
    g.add_argument("--weight-only", action="store_true", help="int8 weights, float activations (FPU targets)")
    g.add_argument("--weights", default="dense", choices=["dense", "codebook", "huffman", "sparse", "auto"],
                   help="how int8 weights are stored in flash (decoded on the fly by the kernels; "
                   "auto: per layer the smallest)")
    g.add_argument("--exit-threshold", default="0.9", help="early-exit models: the confidence an exit needs to "
                   "answer (a probability for softmax, logits for margin; 'off': the full network), or one per "
                   "early exit separated by commas (e.g. 0.8,off); the device's initial value, changeable at run "
                   "time (default 0.9)")
    g.add_argument("--exit-criterion", default="softmax", choices=["softmax", "margin"],
                   help="early-exit models: the exit confidence, the top int8 softmax probability or the margin "
                   "between the two top logits")
    g.add_argument("--library", action="store_true",
                   help="write the model as a C library for your own firmware (no main, UART or protocol): "
                   "src/edgekit_model.h and build files for CMake, Arduino, PlatformIO, Zephyr and Make")
    g.add_argument("--memory-off", help="comma-separated arena techniques to turn off (to measure them): all, "
                   "inplace-depthwise, inplace-conv, inplace-elementwise, op-order, residual-bands, offset-search")
    g.add_argument("--threads", type=int, default=None, help="Raspberry Pi boards: threads that share each large "
                   "layer's output (default: the board's cores, 4; 1: no worker threads)")
    g.set_defaults(fn=cmd_generate)

    x = sub.add_parser("exits", help="add early-exit classifiers after chosen layers of a model and train them")
    x.add_argument("model", help="a torch.export file (.pt2) of a float classifier")
    x.add_argument("--after", required=True, help="comma-separated layer names (module paths, e.g. conv1,block3)")
    x.add_argument("--data", default="digits", help="'digits' (scikit-learn, held-out 20 %%) or an .npz with "
                   "x_train, y_train, x_test, y_test")
    x.add_argument("-o", "--output", required=True, help="the multi-exit model (.pt2) to write")
    x.add_argument("--mode", default="frozen", choices=["frozen", "joint"], help="train the heads only, or the "
                   "whole network on a weighted sum of the exits' losses")
    x.add_argument("--epochs", type=positive_int, default=30)
    x.add_argument("--pool", type=positive_int, help="the grid a head averages a feature map to (default: the finest of "
                   "4x4, 2x2, 1x1 with at most 256 features)")
    x.add_argument("--weights", help="joint mode: loss weights, the early exits then the final (e.g. 1,1,1)")
    x.add_argument("--no-distill", action="store_true", help="do not distil the final exit into the early heads")
    x.add_argument("--calibrate", action="store_true", help="fit each early exit's softmax temperature on the "
                   "training split (its confidence becomes that of softmax(logits / T), folded into the int8 "
                   "exit decision)")
    x.add_argument("--quiet", action="store_true", help="no progress bars")
    x.set_defaults(fn=cmd_exits)

    th = sub.add_parser("thresholds", help="early exits: the accuracy / work curve over thresholds on labelled "
                        "inputs, and the operating point")
    th.add_argument("--project", help="the generated project (the numpy reference runs it: fast, bit-exact)")
    th.add_argument("--port", help="measure on the device instead (with --thresholds)")
    th.add_argument("--inputs", required=True, help=".npy of validation samples (the model's layout)")
    th.add_argument("--labels", required=True, help=".npy of their labels")
    th.add_argument("--thresholds", help="comma-separated thresholds (default: the exact curve, from the reference)")
    th.add_argument("--max-drop", type=float, default=0.01, help="accuracy the operating point may lose against "
                    "the full network (default 0.01 = 1 pp), promised on unseen data with --confidence")
    th.add_argument("--confidence", type=float, default=0.95, help="the confidence of that promise: an exact "
                    "one-sided bound on the drop from the validation samples (default 0.95)")
    th.add_argument("--test-samples", type=int, metavar="M", help="promise the drop a test set of M unseen samples "
                    "will show (an exact prediction bound: M samples scatter around the population's drop); "
                    "default: the population's drop")
    th.add_argument("--per-exit", metavar="SEARCH.npy", help="search one threshold per early exit on these inputs "
                    "(e.g. the training split, never the validation inputs; no labels needed), then test the "
                    "search's path on the validation inputs")
    th.add_argument("--costs", default="macs", help="work per layer: 'macs', or a profile report (.json from "
                    "`edgekit profile --json`) for the device's counts")
    th.add_argument("--int8", action="store_true", help="raw int8 NHWC inputs")
    th.add_argument("--json", help="also write the curve as JSON")
    th.add_argument("--html", help="also write the curve as a self-contained HTML page")
    th.add_argument("--timeout", type=positive_float, default=5.0)
    th.set_defaults(fn=cmd_thresholds)

    e = sub.add_parser("export", help="quantize a model and write it as an int8 .tflite (no TensorFlow needed)")
    e.add_argument("model", help="a torch.export file (.pt2), an ONNX model (.onnx, float or QDQ) or an int8 .tflite")
    e.add_argument("--calib", help="calibration samples (.npy, float32, the model's layout, batched)")
    e.add_argument("-o", "--output", required=True, help=".tflite file to write")
    e.add_argument("--int8-io", action="store_true", help="int8 inputs and outputs (default: float, quantized "
                   "inside the model)")
    e.add_argument("--observer", default="minmax", choices=["minmax", "percentile"])
    e.add_argument("--percentile", type=percentile_arg, default=99.99)
    e.set_defaults(fn=cmd_export)


    c = sub.add_parser("compress", help="run a compression recipe (prune, sparsify, cluster, distill, QAT...) "
                       "on a model, with a report per step")
    c.add_argument("model", help="a torch.export file (.pt2) of a float model")
    c.add_argument("--recipe", required=True, help="the recipe (.toml) listing the steps")
    c.add_argument("--data", default="digits", help="'digits' (scikit-learn, held-out 20 %%) or an .npz with "
                   "x_train, y_train, x_test, y_test")
    c.add_argument("-o", "--output", required=True, help="the compressed model (.pt2) to write")
    c.add_argument("--report", help="write the per-step report as JSON here")
    c.add_argument("--html", help="write the per-step report as a self-contained HTML page (with the final "
                   "C program's memory plan and sections)")
    c.add_argument("--build-dir", help="keep the final model's generated C project here")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(fn=cmd_compress)

    t = sub.add_parser("tune", help="search compression choices for the smallest, fastest model that fits the "
                       "board, every trial built, run as C and measured (Ray Tune; local or a cluster)")
    t.add_argument("model", help="a torch.export file (.pt2) of a float model")
    t.add_argument("--data", default="digits", help="'digits' (scikit-learn, held-out 20 %%) or an .npz with "
                   "x_train, y_train, x_test, y_test")
    t.add_argument("--board", default="host", help="where trials are measured: host (callgrind instructions) or "
                   "an emulated Cortex-M (mps2-an386, ...), or a board file of your own (.toml)")
    t.add_argument("-o", "--output", default="tune", help="directory for the results (default: tune/)")
    t.add_argument("--trials", type=positive_int, default=48)
    t.add_argument("--workers", type=positive_int, help="trials at a time (default: one per core, or per CPU of "
                   "the cluster)")
    t.add_argument("--address", help="a running Ray cluster (ray://head:10001 or host:port); default: this machine")
    t.add_argument("--seed", type=int, default=0, help="the sampler's seed: the same seed repeats a search")
    t.add_argument("--space", help="a TOML file overriding the default search space ([space] and [train])")
    t.add_argument("--max-flash", type=byte_size, help="constraint: flash of the built program (e.g. 64KB)")
    t.add_argument("--max-ram", type=byte_size, help="constraint: RAM of the built program, stack included")
    t.add_argument("--max-drop", type=non_negative_float, help="constraint: accuracy loss against the input "
                   "model, in percentage points")
    t.add_argument("--max-instructions", type=positive_float, help="constraint: instructions per inference")
    t.add_argument("--prefer", default="flash", choices=["flash", "ram", "instructions", "weights", "accuracy"],
                   help="among the trials within the constraints, the best has the least of this (default flash)")
    t.add_argument("--resume", action="store_true", help="continue the interrupted search in --output")
    t.add_argument("--profile-samples", type=positive_int, default=8, help="inferences counted per trial "
                   "(accuracy always uses the whole held-out split)")
    t.add_argument("--unbatched", action="store_true", help="start a trial as soon as a worker is free (faster "
                   "with several workers; the seed then repeats the search exactly only with one worker)")
    t.add_argument("--quiet", action="store_true", help="no progress lines")
    t.set_defaults(fn=cmd_tune)

    b = sub.add_parser("build", help="compile a generated project")
    b.add_argument("project")
    b.add_argument("--sanitize", action="store_true", help="host: build with ASan + UBSan")
    b.add_argument("--stack", metavar="BYTES|auto", help="microcontrollers: the stack reserve; auto = the static "
                   "worst case of the built code (default: the board file's stack_bytes)")
    b.set_defaults(fn=cmd_build)

    r = sub.add_parser("run", help="run a host build on inputs")
    r.add_argument("project")
    r.add_argument("--inputs", required=True, help=".npy: float32 in the model's layout, or int8 NHWC with --int8")
    r.add_argument("--output", help=".npy to write the outputs to")
    r.add_argument("--int8", action="store_true", help="raw int8 tensors in and out, exactly as the C sees them")
    r.add_argument("--sanitize", action="store_true", help="run the sanitizer build")
    r.add_argument("--exit-threshold", help="early-exit models: the threshold to run at (default: the project's)")
    r.set_defaults(fn=cmd_run)

    d = sub.add_parser("demo", help="train, quantize, generate, build, flash and profile a digits CNN")
    d.add_argument("--board", default="mps2-an386", help="default: the emulated Cortex-M4; `host` runs it here")
    d.add_argument("--port", help="a real board's serial port (emulated boards start their own)")
    d.add_argument("--epochs", type=positive_int, default=30)
    d.add_argument("-o", "--output")
    d.set_defaults(fn=cmd_demo)

    e = sub.add_parser("emulate", help="run an emulated board (QEMU) with edgekit's serial bootloader")
    e.add_argument("--board", default="mps2-an386")
    e.add_argument("--port", type=tcp_port, default=4321, help="TCP port of its UART (default 4321)")
    e.add_argument("--log", help="file for QEMU's own messages")
    e.set_defaults(fn=cmd_emulate)

    f = sub.add_parser("flash", help="write a built project to its device and start it")
    f.add_argument("project")
    f.add_argument("--port", help="serial port or URL: /dev/ttyUSB0, socket://127.0.0.1:4321, ...")
    f.add_argument("--method", choices=["serial-bootloader", "openocd", "nrfjprog", "uf2"],
                   help="default: the board's own")
    f.add_argument("--no-start", action="store_true", help="verify but do not jump to the application")
    f.add_argument("--mount", help="uf2: where the board's USB drive is mounted")
    f.set_defaults(fn=cmd_flash)

    pr = sub.add_parser("profile", help="run inferences on a device: counts per layer, memory, bit-exact check")
    pr.add_argument("--port", required=True)
    pr.add_argument("--inputs", required=True, help=".npy of float32 samples (the model's layout), or int8 NHWC "
                    "with --int8")
    pr.add_argument("--labels", help=".npy of class labels: on-device accuracy")
    pr.add_argument("--runs", type=positive_int, help="inferences to run (default: each sample once)")
    pr.add_argument("--project", help="the generated project (default: found from the device's model)")
    pr.add_argument("--int8", action="store_true")
    pr.add_argument("--json", help="also write the report as JSON")
    pr.add_argument("--html", help="also write the report as a self-contained HTML page (per-layer counts, the "
                    "memory plan, flash by section)")
    pr.add_argument("--timeout", type=positive_float, default=5.0, help="seconds to wait for each answer")
    pr.add_argument("--exit-threshold", help="early-exit models: the threshold to run at (default: the project's; "
                    "'off': the full network)")
    pr.add_argument("--no-full", action="store_true", help="early-exit models: skip the second pass with early "
                    "exits off (the full network's count and accuracy)")
    pr.set_defaults(fn=cmd_profile)

    doc = sub.add_parser("doctor", help="check the compilers and emulators edgekit uses")
    doc.set_defaults(fn=cmd_doctor)

    bo = sub.add_parser("boards", help="list the boards")
    bo.set_defaults(fn=cmd_boards)

    i = sub.add_parser("inspect", help="print a model's graph as edgekit sees it")
    i.add_argument("model")
    i.set_defaults(fn=cmd_inspect)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    from .safety import EdgekitWarning
    text = f"edgekit: warning: {message}" if issubclass(category, EdgekitWarning) else \
        f"{filename}:{lineno}: {category.__name__}: {message}"
    try:
        print(text, file=sys.stderr)
    except OSError:
        pass


def main(argv=None) -> int:
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    from .safety import guard_terminal
    guard_terminal()  # names from model files are printed: no raw escape sequences to a terminal
    try:
        code = args.fn(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except EdgekitError as exc:
        print(f"edgekit: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `edgekit ... | head`: the reader left; not an error of edgekit's
        from .safety import quiet_broken_pipe
        quiet_broken_pipe()
        print("edgekit: error: the output was closed before everything was written (e.g. by `head`)",
              file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.strerror is None:
            return _internal_error(exc)
        # A file system problem with a path the user gave (permissions, a directory where a file belongs, a
        # full disk): the operating system's own words and the path, in one line.
        where = f": {exc.filename}" if exc.filename else ""
        print(f"edgekit: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgekit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in edgekit, not in the user's input
        return _internal_error(exc)


def _internal_error(exc: Exception) -> int:
    if os.environ.get("EDGEKIT_DEBUG"):
        raise exc
    print(f"edgekit: internal error: {type(exc).__name__}: {exc}\n"
          "(this is a bug in edgekit; set EDGEKIT_DEBUG=1 for the traceback)", file=sys.stderr)
    return 70


if __name__ == "__main__":
    sys.exit(main())

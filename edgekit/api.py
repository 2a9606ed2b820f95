"""The Python API: each step a plain function.

    graph = edgekit.quantize(model, calibration)          # nn.Module / .pt2 -> int8 graph
    edgekit.generate(graph, "out/", board="host")         # C project
    edgekit.build("out/")                                 # compile it
    y = edgekit.run("out/", x)                            # run it on float inputs (NCHW)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import layout, reference
from . import quant_math as qm
from .errors import EdgekitError
from .ir import Graph
from .passes.fuse import prepare_float
from .passes.quantize import calibrate, quantize as quantize_graph, quantize_weights_only


def load(model, example_input=None, *, input_shape=None) -> Graph:
    """A float IR graph from an ``nn.Module``, an ``ExportedProgram``, an ``onnx.ModelProto`` or a
    file (``.pt2`` from ``torch.export.save``; ``.tflite``; ``.onnx``, float or QDQ-quantized)."""
    if isinstance(model, Graph):
        return model
    if type(model).__name__ == "ModelProto":  # an onnx model in memory
        from .frontends.onnx import load_onnx
        return load_onnx(model)
    if isinstance(model, (str, Path)):
        path = Path(model)
        from .safety import check_graph_shapes
        if path.suffix == ".tflite":
            from .frontends.tflite import load_tflite
            graph = load_tflite(path)
        elif path.suffix == ".onnx":
            from .frontends.onnx import load_onnx
            graph = load_onnx(path)
        else:
            from .frontends.pytorch import from_torch, load_exported
            graph = from_torch(load_exported(path))
        check_graph_shapes(graph)  # a zero-size or negative dimension, named before anything is generated
        return graph
    from .frontends.pytorch import from_torch
    if example_input is not None:
        example_input = np.asarray(example_input, dtype=np.float32)[:1]
    # Exporting puts the module in eval mode; the caller's model is left as it was given.
    modes = [(m, m.training) for m in model.modules()] if hasattr(model, "modules") else []
    try:
        return from_torch(model, example_input, input_shape=input_shape)
    finally:
        for module, training in modes:
            module.train(training)


def _check_samples(name: str, x) -> np.ndarray:
    try:
        x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError):
        raise EdgekitError(f"{name} must be a numeric array") from None
    if x.ndim == 0 or x.shape[0] == 0:
        raise EdgekitError(f"{name} is empty: give at least one sample (batched on axis 0)")
    if not np.all(np.isfinite(x)):
        raise EdgekitError(f"{name} contains NaN or inf values")
    return x


def to_ir_inputs(graph: Graph, x: np.ndarray) -> np.ndarray:
    name = graph.inputs[0]
    return layout.to_ir(x, graph.source_layouts.get(name, "NHWC"), graph.tensors[name].shape[1:])


def quantize(model, calibration, *, observer: str = "minmax", percentile: float = 99.99,
             weight_only: bool = False, show_progress: bool = False, exit_criterion: str = "softmax") -> Graph:
    """Post-training quantization. ``calibration``: float samples in the model's
    own layout (NCHW for PyTorch), batched on axis 0. Returns an int8 graph, or
    with ``weight_only=True`` a graph with int8 weights and float activations.

    A multi-exit model (``edgekit.add_exits``) gets its integer exit decisions:
    ``exit_criterion`` "softmax" (the top int8 softmax probability) or "margin"
    (top logit minus the runner-up), see ``passes/exits.py``."""
    from .passes.exits import CRITERIA, prepare_exits

    from .safety import check_calibration, check_float_samples, check_percentile

    if exit_criterion not in CRITERIA:
        raise EdgekitError(f"unknown exit criterion {exit_criterion!r}: choose one of {', '.join(CRITERIA)}")
    if observer == "percentile":
        check_percentile(percentile)
    calibration = _check_samples("the calibration set", check_float_samples(calibration, "the calibration set"))
    graph = model if isinstance(model, Graph) else load(model, example_input=calibration[:1])
    if graph.is_quantized() or graph.meta.get("weight_only"):
        if weight_only and graph.is_quantized():
            raise EdgekitError("weight-only quantization applies to float models; this model is already int8 "
                               "(a quantized .tflite): generate it as it is, without --weight-only")
        return graph  # already quantized (an int8 .tflite): nothing to calibrate
    float_graph = prepare_float(graph)
    if weight_only:
        if graph.meta.get("exits"):
            raise EdgekitError("early-exit models are int8 only (the exit decisions are integer arithmetic); "
                               "quantize without weight_only")
        return quantize_weights_only(float_graph)
    samples = to_ir_inputs(float_graph, calibration)  # checks the shape first
    check_calibration(samples)
    ranges = calibrate(float_graph, samples, observer=observer,
                       percentile=percentile, show_progress=show_progress)
    return prepare_exits(quantize_graph(float_graph, ranges), exit_criterion)


def export_tflite(graph: Graph, path, *, io: str = "float"):
    """Write an int8 graph as a ``.tflite`` file that tflite-runtime runs (no TensorFlow needed).
    ``io="float"`` puts QUANTIZE / DEQUANTIZE at the edges; ``io="int8"`` keeps raw int8 I/O."""
    from .export.tflite import export_tflite as _export
    return _export(graph, path, io=io)


DEFAULT_EXIT_THRESHOLD = 0.9


def generate(graph: Graph, out_dir, board: str = "host", weights="dense", exit_threshold=DEFAULT_EXIT_THRESHOLD,
             force: bool = False, library: bool = False, example_input=None, memory_off=(), threads=None) -> dict:
    """Write the C project. Returns its record (arena bytes, weight bytes, layers...).

    ``weights``: how the weighted layers store their int8 filters in flash:
    "dense", "codebook" (int8 codebook + bit-packed indices), "huffman"
    (canonical Huffman code of values and zero runs), "sparse" (bitmask +
    nonzeros), "auto" (per layer the fewest bytes), or {layer name: encoding}.
    All are lossless: the C computes exactly what the reference does.

    ``exit_threshold`` (multi-exit models): the confidence an early exit needs to
    answer, a probability for the softmax criterion (logits for margin), or "off";
    the device's initial value, changeable at run time (``DeviceLink.set_exit_threshold``).

    ``out_dir`` must be new, empty, or a project edgekit generated (it is replaced in one step; files
    edgekit did not generate there are kept). ``force`` also overwrites generated files you edited.
    ``library=True``: the model as a C library for your own firmware (no main, UART or protocol) with
    its API header and build files for CMake, Arduino, PlatformIO, Zephyr and Make
    (``codegen/library.py``); ``example_input``'s first sample becomes the example sketch's input.
    ``memory_off``: arena techniques to turn off, "all" (today's greedy plan) or names among
    inplace-depthwise, inplace-conv, inplace-elementwise, op-order, residual-bands, offset-search.
    ``threads`` (Raspberry Pi boards): the threads that share each large layer's output, bit for bit
    the same results (default: the board's cores; 1: no worker threads; a library runs one)."""
    if library:
        from .codegen.library import generate_library
        if threads not in (None, 1):
            raise EdgekitError("a library runs on the caller's thread: threads > 1 is for the Pi's own runners")
        return generate_library(graph, out_dir, board, weights=weights, exit_threshold=exit_threshold,
                                example_input=example_input, force=force, memory_off=memory_off)
    from .codegen.project import generate_project  # here, not at the top: compression imports api, not codegen
    return generate_project(graph, out_dir, board, weights=weights, exit_threshold=exit_threshold, force=force,
                            memory_off=memory_off, threads=threads)


def load_project(out_dir) -> dict:
    """The record ``generate`` saved in ``out_dir`` (edgekit_project.json)."""
    from .codegen.project import load_project as _load_project
    return _load_project(out_dir)


def refuse_library(project: dict, out: Path, what: str) -> None:
    if project.get("library"):
        raise EdgekitError(f"{out} is a library (generate --library): it is {what} by your own firmware's build "
                           f"(CMake: add_subdirectory({out}) and link edgekit_model; see the README)")


def build(out_dir, *, sanitize: bool = False, stack: int | str | None = None) -> dict:
    """Compile a generated project for its board. Returns the project record with sizes.

    ``stack`` (microcontrollers): None keeps the board's stack reserve, an int reserves that many
    bytes, "auto" reserves the static worst case computed from the built code."""
    out = Path(out_dir)
    project = load_project(out)
    refuse_library(project, out, "built")
    from .boards import project_board
    board = project_board(out, project)
    if board.kind == "host" and stack is not None:
        raise EdgekitError("--stack sizes a microcontroller's stack; the host program's is the OS's")
    from .targets.build_record import record_build, require_makefile
    require_makefile(out)
    if board.kind == "host":
        from .targets import host
        binary = host.build(out, sanitize=sanitize)
        from .targets.elf import section_sizes
        project["binary"] = str(binary)
        project["sizes"] = section_sizes(binary)
        record_build(out, [binary])
        return project
    from .targets import build_for_board
    built = build_for_board(board, out, project, stack=stack)
    # Everything this build may have made (the Pi's Makefile builds both runners).
    record_build(out, [built.get("binary"), built.get("image"), out / "model_runner"] if board.kind == "linux-aarch64"
                 else [built.get("binary"), built.get("image")])
    return built


def _quantize_io(x: np.ndarray, rec: dict) -> np.ndarray:
    return qm.quantize(x, rec["scale"], rec["zero_point"])


def run(out_dir, inputs, *, int8: bool = False, sanitize: bool = False, exit_threshold="project",
        with_exit: bool = False):
    """Run the built host program on ``inputs``.

    Float inputs in the source layout (NCHW), quantized with the model's input
    parameters; outputs dequantized back to float in the source layout. With
    ``int8=True``, inputs and outputs are the raw int8 NHWC tensors the C sees.

    A multi-exit model returns every exit's output (see ``passes/exits.py``)
    at ``exit_threshold`` (default: the project's); ``with_exit=True`` returns
    ``(outputs, exit index per sample)``.
    """
    out = Path(out_dir)
    project = load_project(out)
    from .boards import project_board
    board = project_board(out, project)
    if board.kind not in ("host", "linux-aarch64"):
        raise EdgekitError(f"{out} was generated for board {project['board']!r}; `run` executes host and "
                           "Raspberry Pi builds (the latter under qemu-aarch64). Use `edgekit profile` for a device.")
    if len(project["inputs"]) != 1:
        raise EdgekitError("run takes models with one input")
    inp, outp = project["inputs"][0], project["outputs"]
    sample_shape = inp["shape"][1:]
    from .targets import host
    if int8:
        x = np.asarray(inputs)
        if x.dtype != np.int8:
            raise EdgekitError(f"--int8 inputs must be int8 arrays, got {x.dtype}")
        if list(x.shape[1:]) != list(sample_shape):
            raise EdgekitError(f"int8 inputs have samples of shape {list(x.shape[1:])}, "
                               f"the model expects {sample_shape} (NHWC)")
        data = x
    else:
        from .safety import check_float_samples
        x = _check_samples("the inputs", check_float_samples(inputs, "the inputs"))
        x = layout.to_ir(x, inp["layout"], sample_shape)
        data = x if project["mode"] == "weight_only" else _quantize_io(x, inp)
    dtype = np.float32 if project["mode"] == "weight_only" else np.int8
    total = sum(int(np.prod(o["shape"])) for o in outp)
    exits = project.get("exits")
    args = []
    if exits:  # the runner takes the threshold and writes the answering exit after the outputs
        from .passes.exits import device_thresholds
        from .safety import check_exit_threshold
        check_exit_threshold(exit_threshold, exits.get("criterion", "softmax"))
        raw = exits["threshold"] if exit_threshold == "project" else \
            device_thresholds(exit_threshold, len(exits["names"]) - 1)
        args = [",".join(str(r) for r in raw) if isinstance(raw, list) else raw]
        total += 1
    if board.kind == "linux-aarch64":
        from .targets import linux_aarch64
        raw = linux_aarch64.run_raw(board, out, data, total, dtype, args=args)
    else:
        raw = host.run_raw(out, data, total, dtype, sanitize=sanitize, args=args)
    index = raw[:, -1].astype(np.int64) if exits else np.zeros(raw.shape[0], np.int64)
    results, start = [], 0
    for o in outp:
        n = int(np.prod(o["shape"]))
        y = raw[:, start:start + n].reshape([raw.shape[0]] + o["shape"][1:])
        start += n
        if not int8 and project["mode"] == "int8":
            y = qm.dequantize(y, o["scale"], o["zero_point"])
        if not int8:
            y = layout.from_ir(y, o["layout"])
        results.append(y)
    results = results[0] if len(results) == 1 else results
    return (results, index) if with_exit else results


def _reference_outputs(graph: Graph, x: np.ndarray, exit_threshold):
    from .passes.exits import device_thresholds, num_early_exits, run_exits
    if graph.meta.get("exits", {}).get("criterion"):
        return run_exits(graph, x, device_thresholds(exit_threshold, num_early_exits(graph)))
    return reference.run(graph, x), np.zeros(x.shape[0], np.int64)


def reference_run(graph: Graph, inputs, *, int8: bool = False, exit_threshold=DEFAULT_EXIT_THRESHOLD,
                  with_exit: bool = False):
    """The numpy reference on the same terms as ``run``: what the C must produce.
    A multi-exit graph runs at ``exit_threshold`` (give the one the device uses)."""
    if int8:
        outs, index = _reference_outputs(graph, np.asarray(inputs), exit_threshold)
        outs = outs[0] if len(outs) == 1 else outs
        return (outs, index) if with_exit else outs
    if graph.meta.get("weight_only"):
        from .passes.quantize import dequantized_weights_graph
        graph = dequantized_weights_graph(graph)
    x = to_ir_inputs(graph, _check_samples("the inputs", inputs))
    quantized = graph.is_quantized()
    if quantized:
        q = graph.tensors[graph.inputs[0]].quant
        x = qm.quantize(x, q.scale[0], q.zero_point[0])
    outs, index = _reference_outputs(graph, x, exit_threshold)
    results = []
    for name, y in zip(graph.outputs, outs):
        if quantized:
            q = graph.tensors[name].quant
            y = qm.dequantize(y, q.scale[0], q.zero_point[0])
        results.append(layout.from_ir(y, graph.source_layouts.get(name, "NHWC")))
    results = results[0] if len(results) == 1 else results
    return (results, index) if with_exit else results

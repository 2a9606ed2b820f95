"""Test helpers: build single-op graphs, and compile + run generated C for real."""
from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import numpy as np

from edgekit.codegen.project import generate_project, load_project
from edgekit.ir import Graph, Op, Tensor, conv_output_size
from edgekit.passes.fuse import prepare_float
from edgekit.passes.quantize import calibrate, quantize

SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
WARN = ["-std=c99", "-Wall", "-Wextra", "-Werror"]


# MLPerf Tiny's official models, where the bench looks for them (beside the checkout, or the shared folder
# of this workplace); tests that need them skip when neither exists.
MLPERF_TINY = next((d for d in (Path(__file__).resolve().parents[2] / "shared" / "mlperf-tiny",
                                Path("/work/shared/mlperf-tiny")) if d.exists()), Path("/work/shared/mlperf-tiny"))


def float_graph(kind: str, input_shapes, attrs: dict, weights=None, out_shape=None) -> Graph:
    """A one-op float graph: inputs x0, x1..., constants from ``weights``."""
    g = Graph()
    names = []
    for i, shape in enumerate(input_shapes):
        name = f"x{i}"
        g.add_tensor(Tensor(name, tuple(shape)))
        g.inputs.append(name)
        g.source_layouts[name] = "NHWC"
        names.append(name)
    for wname, data in (weights or {}).items():
        g.add_tensor(Tensor(wname, data.shape, "float32", data.astype(np.float32)))
        names.append(wname)
    g.add_tensor(Tensor("y", tuple(out_shape)))
    g.outputs.append("y")
    g.source_layouts["y"] = "NHWC"
    g.ops.append(Op(kind, "op", names, ["y"], dict(attrs)))
    return g


def conv_out(h, w, k, stride, dilation, padding):
    return (conv_output_size(h, k[0], stride[0], dilation[0], padding[0], padding[1]),
            conv_output_size(w, k[1], stride[1], dilation[1], padding[2], padding[3]))


def conv_out_nonempty(h, w, k, stride, padding, dilation=(1, 1)):
    """The output size of a convolution drawn at random, and its padding: a window larger than the
    padded input gets its (dilated) extent more rows / columns of top / left padding, so the output is
    not empty."""
    out = conv_out(h, w, k, stride, dilation, padding)
    if out[0] < 1 or out[1] < 1:
        padding = (padding[0] + k[0] * dilation[0], padding[1], padding[2] + k[1] * dilation[1], padding[3])
        out = conv_out(h, w, k, stride, dilation, padding)
    return out, padding


def quantize_with_random_data(g: Graph, rng: np.random.Generator, ranges=None, observer="minmax") -> Graph:
    """Calibrate on random data whose per-input range is given (lo, hi)."""
    g = prepare_float(g)
    samples = {}
    for i, name in enumerate(g.inputs):
        lo, hi = (ranges or {}).get(name, (-1.0, 1.0))
        samples[name] = rng.uniform(lo, hi, size=(16,) + g.tensors[name].shape[1:]).astype(np.float32)
    if len(g.inputs) == 1:
        r = calibrate(g, samples[g.inputs[0]], observer=observer)
    else:  # calibrate() takes one input; merge ranges over a keep-all run
        from edgekit import reference
        values = reference.run(g, samples, keep=True)
        r = {k: (float(v.min()), float(v.max())) for k, v in values.items()}
    return quantize(g, r)


def tiny_quantized_fc() -> Graph:
    """A 4 -> 4 fully connected int8 graph: enough to generate a project's headers and board files
    for tests that bring their own C."""
    rng = np.random.default_rng(0)
    g = float_graph("fully_connected", [(1, 4)], dict(activation="none"), {"w": rng.normal(0, 1, (4, 4))}, (1, 4))
    return quantize_with_random_data(g, rng)


class CBuild:
    """Compile generated projects the way their Makefile does, with the kernels
    compiled once per session (they are the same files for every model)."""

    def __init__(self, root: Path, sanitize: bool = True, extra_flags: tuple[str, ...] = ()):
        self.root = root
        self.sanitize = sanitize
        self.extra = list(extra_flags)  # e.g. -mavx2: the x86 kernels' vector path
        self.lock = threading.Lock()
        self.objects: dict[str, Path] = {}

    def _kernel_object(self, project: Path, kernel: str) -> Path:
        with self.lock:
            if kernel not in self.objects:
                obj = self.root / f"{kernel}.o"
                tmp = self.root / f"{kernel}.{os.getpid()}.o"
                cmd = ["gcc", "-O1", "-g", *WARN, *self.extra, *(SANITIZE if self.sanitize else []),
                       "-I", str(project / "include"), "-c", str(project / "kernels" / f"{kernel}.c"), "-o", str(tmp)]
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                tmp.replace(obj)
                self.objects[kernel] = obj
            return self.objects[kernel]

    def build(self, project: Path) -> Path:
        record = load_project(project)
        objs = [str(self._kernel_object(project, k)) for k in record["kernels"]]
        exe = project / "model_runner_test"
        cmd = ["gcc", "-O1", "-g", *WARN, *self.extra, *(SANITIZE if self.sanitize else []),
               "-I", str(project / "include"), "-I", str(project), *(str(project / f) for f in ("main.c", "ek_port.c", "ek_protocol.c", "ek_app.c",
                                                                 "model.c", "model_weights.c")),
               *objs, "-o", str(exe), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return exe


def run_c(exe: Path, inputs: list[np.ndarray], out_elems: int, dtype=np.int8) -> np.ndarray:
    """Run a test build: inputs are batched arrays, one per model input, interleaved per sample."""
    n = inputs[0].shape[0]
    parts = [np.ascontiguousarray(x, dtype=dtype).reshape(n, -1) for x in inputs]
    data = np.concatenate(parts, axis=1)
    src, dst = exe.parent / "in.bin", exe.parent / "out.bin"
    data.tofile(src)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    proc = subprocess.run([str(exe), str(src), str(dst)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runtime error" not in proc.stderr, proc.stderr[-3000:]
    out = np.fromfile(dst, dtype=dtype)
    assert out.size == n * out_elems
    return out.reshape(n, out_elems)


def c_matches_reference(g: Graph, tmp: Path, cbuild: CBuild, inputs: dict[str, np.ndarray], weights="dense",
                        memory_off=()):
    """Generate (with the given weight encoding and memory techniques off), build and run ``g``; return
    (C outputs, reference outputs) flattened per sample."""
    from edgekit import reference

    generate_project(g, tmp, "host", weights=weights, memory_off=memory_off)
    exe = cbuild.build(tmp)
    out_elems = sum(g.tensors[n].size for n in g.outputs)
    dtype = np.float32 if g.meta.get("weight_only") else np.int8
    got = run_c(exe, [inputs[n] for n in g.inputs], out_elems, dtype)
    ref_graph = g
    if g.meta.get("weight_only"):
        from edgekit.passes.quantize import dequantized_weights_graph
        ref_graph = dequantized_weights_graph(g)
    refs = reference.run(ref_graph, inputs if len(g.inputs) > 1 else inputs[g.inputs[0]])
    ref = np.concatenate([r.reshape(r.shape[0], -1) for r in refs], axis=1)
    return got, ref


def tflite_run(path, inputs: list[np.ndarray], builtin_ref: bool = True) -> list[np.ndarray]:
    """Run a .tflite file sample by sample in tflite-runtime: its reference kernels (BUILTIN_REF, what
    TFLite Micro also computes) unless ``builtin_ref`` is False (BUILTIN_REF registers no ELU)."""
    import tflite_runtime.interpreter as tflite_runtime  # only the tests that compare with TFLite need it

    resolver = tflite_runtime.OpResolverType.BUILTIN_REF if builtin_ref else tflite_runtime.OpResolverType.BUILTIN
    it = tflite_runtime.Interpreter(model_path=str(path), experimental_op_resolver_type=resolver)
    it.allocate_tensors()
    ins, outs = it.get_input_details(), it.get_output_details()
    results = [[] for _ in outs]
    for i in range(inputs[0].shape[0]):
        for d, x in zip(ins, inputs):
            it.set_tensor(d["index"], x[i:i + 1].astype(d["dtype"]))
        it.invoke()
        for r, d in zip(results, outs):
            r.append(it.get_tensor(d["index"]))
    return [np.concatenate(r) for r in results]

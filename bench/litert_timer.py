"""Time a .tflite model in ai-edge-litert (its default XNNPACK path), one thread.

Run with a Python that has ai-edge-litert (it needs numpy 2, so its own venv):
    python litert_timer.py model.tflite inputs.npy iterations  -> JSON on stdout
    python litert_timer.py model.tflite inputs.npy serve xnnpack|builtin wall|cpu
        -> one JSON line with the outputs for inputs.npy, then for each line "N" read on stdin
           the nanoseconds per inference of N back-to-back invocations (bench/bench_x86_vs_xnnpack.py
           interleaves these with the C's runs). "builtin": LiteRT's own kernels, default delegates off;
           "cpu": the thread's CPU time instead of the wall clock.
"""
import json
import sys
import time

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType


def interpreter(path: str, inputs: np.ndarray, mode: str = "xnnpack"):
    resolver = {"xnnpack": OpResolverType.AUTO, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}[mode]
    it = Interpreter(model_path=path, num_threads=1, experimental_op_resolver_type=resolver)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    outputs = []
    for x in inputs:
        it.set_tensor(inp["index"], x[None].astype(inp["dtype"]))
        it.invoke()
        outputs.append(it.get_tensor(out["index"]).copy())
    it.set_tensor(inp["index"], inputs[:1].astype(inp["dtype"]))
    return it, np.concatenate(outputs)


def per_inference_ns(it, iterations: int, clock=time.perf_counter) -> float:
    t0 = clock()
    for _ in range(iterations):
        it.invoke()
    return (clock() - t0) / iterations * 1e9


def main():
    path, inputs = sys.argv[1], np.load(sys.argv[2])
    if sys.argv[3] == "serve":
        it, outputs = interpreter(path, inputs, sys.argv[4])
        clock = {"wall": time.perf_counter, "cpu": time.thread_time}[sys.argv[5]]
        print(json.dumps({"outputs": outputs.tolist()}), flush=True)
        for line in sys.stdin:
            print(f"{per_inference_ns(it, int(line), clock):.1f}", flush=True)
        return
    iterations = int(sys.argv[3])
    it, outputs = interpreter(path, inputs)
    best = min(per_inference_ns(it, iterations) for _ in range(5))
    print(json.dumps({"ns": best, "outputs": outputs.tolist()}))


if __name__ == "__main__":
    main()

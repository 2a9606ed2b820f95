"""Time a .tflite model in ai-edge-litert (its default XNNPACK path), one thread.

Run with a Python that has ai-edge-litert (it needs numpy 2, so its own venv):
    python litert_timer.py model.tflite inputs.npy iterations  -> JSON on stdout
"""
import json
import sys
import time

import numpy as np
from ai_edge_litert.interpreter import Interpreter


def main():
    path, inputs, iterations = sys.argv[1], np.load(sys.argv[2]), int(sys.argv[3])
    it = Interpreter(model_path=path, num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    outputs = []
    for x in inputs:
        it.set_tensor(inp["index"], x[None].astype(inp["dtype"]))
        it.invoke()
        outputs.append(it.get_tensor(out["index"]).copy())
    it.set_tensor(inp["index"], inputs[:1].astype(inp["dtype"]))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iterations):
            it.invoke()
        best = min(best, (time.perf_counter() - t0) / iterations)
    print(json.dumps({"ns": best * 1e9, "outputs": np.concatenate(outputs).tolist()}))


if __name__ == "__main__":
    main()

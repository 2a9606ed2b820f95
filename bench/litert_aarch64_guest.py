"""Run inside the arm64 Python under qemu-aarch64 (bench/litert_aarch64.py starts it): a .tflite model in
ai-edge-litert, one thread, a few invocations on one fixed input, for the instruction counter.

    python3.11 litert_aarch64_guest.py probe                          -> "base 0x..." and exit
    python3.11 litert_aarch64_guest.py MODEL xnnpack|builtin N OUT.npy

Prints the load address of the library holding tflite::Subgraph::Invoke() (libpywrap_litert_common.so;
fixed under qemu-user, so a probe run tells the counting run where to look) and, when
EK_LITERT_BASE is set, refuses to run if the library landed elsewhere (the counts would be of nothing)."""
import os
import sys

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

LIBRARY = "libpywrap_litert_common.so"


def library_base() -> int:
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith("/" + LIBRARY) and int(fields[2], 16) == 0:
            return int(fields[0].split("-")[0], 16)
    raise SystemExit(f"{LIBRARY} is not mapped")


def main():
    base = library_base()
    print(f"base {base:#x}", flush=True)
    if sys.argv[1] == "probe":  # (started with the counting run's plugin and environment)
        return
    if os.environ.get("EK_LITERT_BASE") and int(os.environ["EK_LITERT_BASE"], 16) != base:
        raise SystemExit(f"{LIBRARY} at {base:#x}, the probe saw {os.environ['EK_LITERT_BASE']}")
    path, mode, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    resolver = {"xnnpack": OpResolverType.AUTO, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}[mode]
    it = Interpreter(model_path=path, num_threads=1, experimental_op_resolver_type=resolver)
    it.allocate_tensors()
    inp, res = it.get_input_details()[0], it.get_output_details()[0]
    x = np.random.default_rng(0).integers(-128, 128, size=inp["shape"]).astype(np.int8).astype(inp["dtype"])
    outputs = []
    for _ in range(n):  # the first invocation may set up (XNNPACK packs its weights then): counted apart
        it.set_tensor(inp["index"], x)
        it.invoke()
        outputs.append(it.get_tensor(res["index"]).copy())
    np.save(out, np.stack(outputs))


if __name__ == "__main__":
    main()

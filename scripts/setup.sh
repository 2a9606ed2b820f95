#!/usr/bin/env bash
# Install everything edgekit needs on Debian/Ubuntu, idempotently:
#   - compilers and emulators from Debian packages (apt-get, only what is missing)
#   - a virtualenv in .venv with edgekit and its Python dependencies
# Safe to run again: it only does what is not done yet.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${EDGEKIT_TORCH:-2.13.0}

missing=()
have() { command -v "$1" >/dev/null 2>&1; }
have gcc || missing+=(gcc)
have make || missing+=(make)
have cmake || missing+=(cmake)  # the library output's CMake build (tests)
have arm-none-eabi-gcc || missing+=(gcc-arm-none-eabi)
[ -e /usr/lib/arm-none-eabi/newlib/libc.a ] || [ -e /usr/lib/arm-none-eabi/lib/libc.a ] || missing+=(libnewlib-arm-none-eabi)
have qemu-system-arm || missing+=(qemu-system-arm)
have aarch64-linux-gnu-gcc || missing+=(gcc-aarch64-linux-gnu)
[ -d /usr/aarch64-linux-gnu/lib ] || missing+=(libc6-dev-arm64-cross)
have qemu-aarch64 || missing+=(qemu-user)
have clang || missing+=(clang)
have valgrind || missing+=(valgrind)  # bench: instructions per inference (callgrind)
have chromium || missing+=(chromium)  # tests: the HTML reports open in a real headless browser
"$PYTHON" -c "import venv, ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)

if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# libFuzzer's runtime ships in a separate package on some releases.
if have clang && ! echo 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n){(void)d;(void)n;return 0;}' \
        | clang -x c -fsanitize=fuzzer -o /dev/null - >/dev/null 2>&1; then
    ver=$(clang --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -1)
    echo "setup: installing libclang-rt-${ver}-dev (libFuzzer runtime)"
    SUDO=""; if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "libclang-rt-${ver}-dev" >/dev/null \
        || echo "setup: warning: libFuzzer runtime not available; the fuzz test will be skipped"
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.edgekit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    # The CPU build of torch first: an unpinned torch can pull a multi-GB CUDA build.
    if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
        echo "setup: installing torch==${TORCH_VERSION} (CPU)"
        .venv/bin/python -m pip install -q "torch==${TORCH_VERSION}" 2>&1 | grep -v "^WARNING: Location" || true
    fi
    echo "setup: installing edgekit and its test dependencies (with the tune extra: Ray Tune, Optuna)"
    .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import edgekit, torch, numpy, jinja2, serial, elftools, sklearn, hypothesis, pytest, matplotlib, onnx, onnxruntime, onnxscript, ray.tune, optuna" \
        || { echo "setup: the Python environment is incomplete"; exit 1; }
    touch "$stamp"
fi
echo "setup: ready ($(.venv/bin/python --version), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"

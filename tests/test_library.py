"""`edgekit generate --library`: the model as a C library in the user's own build.

A user application of the test's own (its own main, startup code, linker script and UART output, no
edgekit runtime) links the library through its CMakeLists.txt: on the host, and with an arm-none-eabi
toolchain file for the Cortex-M4, run under QEMU. Both print what the API gave them and must equal the
numpy reference bit for bit. The Arduino sketch compiles as the Arduino build would compile it (a
stand-in Arduino.h, declared here, replaces the core), and the manifests hold their documented fields.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgekit import api, models
from edgekit import quant_math as qm
from edgekit.codegen.library import generate_library
from edgekit.codegen.render import c_float
from edgekit.errors import EdgekitError
from helpers import SANITIZE

needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake (make setup)")
needs_arm = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None, reason="needs arm-none-eabi-gcc")
needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-arm") is None, reason="needs qemu-system-arm")
SAMPLES = 3


@pytest.fixture(scope="module")
def cnn_graph(digits):
    """The digits CNN, untrained (seeded): conv, depthwise, pooling, mean and FC kernels all run."""
    import torch
    torch.manual_seed(3)
    return api.quantize(models.DigitsCNN().eval(), digits.x_train[:64])


@pytest.fixture(scope="module")
def samples(digits, cnn_graph):
    """Float inputs (NHWC, as the library takes them) and what the reference makes of them."""
    x = digits.x_test[:SAMPLES]
    inp = cnn_graph.tensors[cnn_graph.inputs[0]]
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).astype(np.float32)
    q_in = qm.quantize(nhwc, inp.quant.scale[0], inp.quant.zero_point[0])
    y = api.reference_run(cnn_graph, q_in, int8=True)
    out = cnn_graph.tensors[cnn_graph.outputs[0]].quant
    return {"x": nhwc, "q_in": q_in, "y": y, "f": qm.dequantize(y, out.scale[0], out.zero_point[0])}


def _expected_lines(samples) -> list[str]:
    lines = []
    for s in range(SAMPLES):
        lines.append("q " + samples["q_in"][s].reshape(-1).view(np.uint8).tobytes().hex())
        lines.append("y " + samples["y"][s].reshape(-1).view(np.uint8).tobytes().hex())
        bits = np.asarray(samples["f"][s].reshape(-1), np.float32).view(np.uint32)
        lines.append("f " + "".join(f"{b:08x}" for b in bits))
        lines.append(f"class {int(np.argmax(samples['y'][s].reshape(-1)))}")
    return lines


def _inputs_header(samples) -> str:
    rows = ",\n".join("    {" + ", ".join(c_float(v) for v in s.reshape(-1)) + "}" for s in samples["x"])
    n, size = samples["x"].shape[0], samples["x"][0].size
    return (f"#define SAMPLES {n}\n#define SAMPLE_SIZE {size}\n"
            f"static const float samples[SAMPLES][SAMPLE_SIZE] = {{\n{rows}\n}};\n")


# The user's application: one inference per sample through the API, printed as hex; `put` is the
# only thing each platform provides (stdout on the host, the app's own UART driver on the M4).
APP_BODY = r"""
#include <stdint.h>
#include <string.h>
#include "edgekit_model.h"
#include "samples.h"

void put(const char *text);

static void put_hex(const char *tag, const uint8_t *bytes, uint32_t n)
{
    static char line[2 * 4 * 64 + 8];
    static const char hex[] = "0123456789abcdef";
    char *p = line;
    *p++ = tag[0];
    *p++ = ' ';
    for (uint32_t i = 0; i < n; ++i) {
        *p++ = hex[bytes[i] >> 4];
        *p++ = hex[bytes[i] & 15];
    }
    *p++ = '\n';
    *p = 0;
    put(line);
}

int run_samples(void)
{
    static float scores[EK_MODEL_OUTPUT0_SIZE];
    static uint8_t bits[4 * EK_MODEL_OUTPUT0_SIZE];
    if (ek_model_init() != 0 || ek_model_input_tensor(0)->size != SAMPLE_SIZE ||
        ek_model_output_tensor(1) != 0 || ek_model_quantize_input(0, samples[0], SAMPLE_SIZE - 1) != -1) {
        return 3;
    }
    for (int s = 0; s < SAMPLES; ++s) {
        if (ek_model_quantize_input(0, samples[s], SAMPLE_SIZE) != 0) {
            return 4;
        }
        put_hex("q", (const uint8_t *)ek_model_input(0), SAMPLE_SIZE);
        ek_model_invoke();
        put_hex("y", (const uint8_t *)ek_model_output(0), EK_MODEL_OUTPUT0_SIZE);
        ek_model_dequantize_output(0, scores, EK_MODEL_OUTPUT0_SIZE);
        for (int i = 0; i < EK_MODEL_OUTPUT0_SIZE; ++i) { /* big-endian hex of each float's bits */
            uint32_t b;
            memcpy(&b, &scores[i], 4);
            for (int k = 0; k < 4; ++k) {
                bits[4 * i + k] = (uint8_t)(b >> (24 - 8 * k));
            }
        }
        put_hex("f", bits, 4 * EK_MODEL_OUTPUT0_SIZE);
        char line[16] = "class 0\n";
        line[6] = (char)('0' + ek_model_output_argmax(0));
        put(line);
    }
    return 0;
}
"""

HOST_MAIN = r"""
#include <stdio.h>
int run_samples(void);
void put(const char *text) { fputs(text, stdout); }
int main(void) { return run_samples(); }
"""

HOST_CMAKE = """cmake_minimum_required(VERSION 3.14)
project(user_app C)
include(FetchContent)
FetchContent_Declare(edgekit_model SOURCE_DIR "{lib}")
FetchContent_MakeAvailable(edgekit_model)
add_executable(user_app main.c app.c)
target_link_libraries(user_app PRIVATE edgekit_model)
"""

# The M4 application's own startup: vector table, .data / .bss, the FPU on, main, semihosting exit.
M4_STARTUP = r"""
#include <stdint.h>
extern uint32_t __data_load[], __data_start[], __data_end[], __bss_start[], __bss_end[], __stack_top[];
int main(void);
void reset(void);
static void halt(void) { for (;;) { } }
__attribute__((section(".isr_vector"), used)) void (*const vectors[16])(void) = {
    (void (*)(void))(uintptr_t)__stack_top, reset, halt, halt, halt, halt, halt, 0, 0, 0, 0, halt, halt, 0, halt, halt};
static void semihosting_exit(uint32_t code)
{
    const uint32_t block[2] = {0x20026u, code};
    register uint32_t r0 __asm__("r0") = 0x20u;
    register const uint32_t *r1 __asm__("r1") = block;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
}
void reset(void)
{
    uint32_t *s = __data_load, *d = __data_start;
    while (d < __data_end) *d++ = *s++;
    for (d = __bss_start; d < __bss_end; ++d) *d = 0u;
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20; /* CPACR: the FPU, for the hard-float ABI */
    __asm__ volatile("dsb\n isb" ::: "memory");
    semihosting_exit((uint32_t)main());
    halt();
}
"""

M4_MAIN = r"""
#include <stdint.h>
#define UART_DATA (*(volatile uint32_t *)0x40004000u)
#define UART_STATE (*(volatile uint32_t *)0x40004004u)
#define UART_CTRL (*(volatile uint32_t *)0x40004008u)
int run_samples(void);
void put(const char *text)
{
    for (; *text; ++text) {
        while (UART_STATE & 1u) { }
        UART_DATA = (uint8_t)*text;
    }
}
int main(void)
{
    UART_CTRL = 1u; /* TX on before the first write */
    return run_samples();
}
"""

M4_LINKER = """
MEMORY { FLASH (rx) : ORIGIN = 0x00000000, LENGTH = 4M  RAM (rwx) : ORIGIN = 0x20000000, LENGTH = 4M }
SECTIONS {
  .text : { KEEP(*(.isr_vector)) *(.text*) *(.rodata*) . = ALIGN(4); } > FLASH
  .ARM.exidx : { *(.ARM.exidx*) } > FLASH
  .data : { . = ALIGN(4); __data_start = .; *(.data*) . = ALIGN(4); __data_end = .; } > RAM AT > FLASH
  __data_load = LOADADDR(.data);
  .bss (NOLOAD) : { . = ALIGN(4); __bss_start = .; *(.bss*) *(COMMON) . = ALIGN(4); __bss_end = .; } > RAM
  __stack_top = ORIGIN(RAM) + LENGTH(RAM);
}
"""

M4_CMAKE = """cmake_minimum_required(VERSION 3.13)
project(user_app C)
add_subdirectory("{lib}" edgekit_model)
add_executable(user_app.elf main.c app.c startup.c)
target_link_libraries(user_app.elf PRIVATE edgekit_model)
target_link_options(user_app.elf PRIVATE -nostartfiles -T${{CMAKE_CURRENT_SOURCE_DIR}}/app.ld
                    --specs=nano.specs --specs=nosys.specs)
"""

# A toolchain file as a user would write one: the compiler only; the CPU flags come from edgekit_model.
ARM_TOOLCHAIN = """set(CMAKE_SYSTEM_NAME Generic)
set(CMAKE_SYSTEM_PROCESSOR arm)
set(CMAKE_C_COMPILER arm-none-eabi-gcc)
set(CMAKE_TRY_COMPILE_TARGET_TYPE STATIC_LIBRARY)
"""


def _cmake_build(app: Path, build: Path, *extra: str) -> None:
    for cmd in (["cmake", "-S", str(app), "-B", str(build), *extra], ["cmake", "--build", str(build), "-j", "2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _write_app(app: Path, samples, files: dict) -> None:
    app.mkdir(parents=True)
    (app / "samples.h").write_text(_inputs_header(samples))
    (app / "app.c").write_text(APP_BODY)
    for name, text in files.items():
        (app / name).write_text(text)


@needs_cmake
def test_cmake_host_application_links_the_library_and_equals_the_reference(cnn_graph, samples, tmp_path):
    lib = tmp_path / "edgekit_model"
    record = generate_library(cnn_graph, lib, "host")
    assert record["library"] and not (lib / "main.c").exists() and not (lib / "src" / "ek_protocol.c").exists()
    assert not list(lib.rglob("ek_port.h")) and not list(lib.rglob("ek_uart*"))
    app = tmp_path / "app"
    _write_app(app, samples, {"main.c": HOST_MAIN, "CMakeLists.txt": HOST_CMAKE.format(lib=lib)})
    flags = "-std=c99 -Wall -Wextra -Werror -fsanitize=address,undefined -fno-sanitize-recover=all"
    _cmake_build(app, tmp_path / "build", f"-DCMAKE_C_FLAGS={flags}")
    proc = subprocess.run([str(tmp_path / "build" / "user_app")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == _expected_lines(samples)


@needs_cmake
@needs_arm
@needs_qemu
def test_cmake_cortex_m4_application_runs_under_qemu_and_equals_the_reference(cnn_graph, samples, tmp_path):
    lib = tmp_path / "edgekit_model"
    generate_library(cnn_graph, lib, "mps2-an386")
    assert (lib / "src" / "ek_dsp.h").exists()  # the board's DSP kernels, not the portable ones
    app = tmp_path / "app"
    _write_app(app, samples, {"main.c": M4_MAIN, "startup.c": M4_STARTUP, "app.ld": M4_LINKER,
                              "CMakeLists.txt": M4_CMAKE.format(lib=lib)})
    (tmp_path / "arm-none-eabi.cmake").write_text(ARM_TOOLCHAIN)
    _cmake_build(app, tmp_path / "build", f"-DCMAKE_TOOLCHAIN_FILE={tmp_path / 'arm-none-eabi.cmake'}",
                 "-DCMAKE_C_FLAGS=-std=c99 -Wall -Wextra -Werror -O2")
    elf = tmp_path / "build" / "user_app.elf"
    # The board's flags reached the application through the INTERFACE property: a hard-float M4 ELF.
    header = subprocess.run(["arm-none-eabi-readelf", "-h", "-A", str(elf)], capture_output=True, text=True).stdout
    assert "hard float" in header.lower() or "Tag_ABI_VFP_args: VFP registers" in header
    proc = subprocess.Popen(["qemu-system-arm", "-M", "mps2-an386", "-display", "none", "-monitor", "none",
                             "-serial", "stdio", "-semihosting-config", "enable=on,target=native",
                             "-kernel", str(elf)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert out.replace("\r", "").splitlines() == _expected_lines(samples)


# -- Arduino ------------------------------------------------------------------------------------------

ARDUINO_STAND_IN_H = r"""/* A stand-in for the Arduino core's Arduino.h, declared by the test: only what the example sketch uses. */
#ifndef ARDUINO_STAND_IN_H
#define ARDUINO_STAND_IN_H
#include <stddef.h>
#include <stdint.h>
class StandInSerial {
public:
    void begin(unsigned long baud);
    size_t print(const char *text);
    size_t println(long value);
};
extern StandInSerial Serial;
#endif
"""

ARDUINO_STAND_IN_MAIN = r"""/* The stand-in core's side: Serial as no-ops, and a main that runs setup() once. */
#include <Arduino.h>
StandInSerial Serial;
void StandInSerial::begin(unsigned long) {}
size_t StandInSerial::print(const char *) { return 0; }
size_t StandInSerial::println(long) { return 0; }
void setup();
void loop();
int main() { setup(); loop(); return 0; }
"""


def _sketch_cpp(ino: Path) -> str:
    """What the Arduino build makes of a sketch: Arduino.h first, prototypes, then the sketch as C++."""
    return f'#include <Arduino.h>\nvoid setup();\nvoid loop();\n#line 1 "{ino.name}"\n' + ino.read_text()


@needs_arm
def test_arduino_sketch_and_library_compile_as_the_arduino_build_would(cnn_graph, digits, tmp_path):
    lib = tmp_path / "edgekit_model"
    generate_library(cnn_graph, lib, "mps2-an386", example_input=digits.x_test[:1])
    sketch = lib / "examples" / "classify"
    assert (sketch / "classify.ino").exists() and "ek_example_input" in (sketch / "example_input.h").read_text()
    stand_in = tmp_path / "arduino_core_stand_in"
    stand_in.mkdir()
    (stand_in / "Arduino.h").write_text(ARDUINO_STAND_IN_H)
    (stand_in / "stand_in_main.cpp").write_text(ARDUINO_STAND_IN_MAIN)
    (tmp_path / "classify.ino.cpp").write_text(_sketch_cpp(sketch / "classify.ino"))
    cpu = ["-mcpu=cortex-m4", "-mthumb", "-mfpu=fpv4-sp-d16", "-mfloat-abi=hard"]
    warn = ["-Wall", "-Wextra", "-Werror"]
    objects = []
    # The library: every .c under src/, recursively (Arduino's 1.5 library format), with src/ on the
    # include path and nothing else.
    for c in sorted((lib / "src").rglob("*.c")):
        obj = tmp_path / f"{c.stem}.o"
        subprocess.run(["arm-none-eabi-gcc", "-std=gnu11", "-Os", *cpu, *warn, f"-I{lib / 'src'}", "-c", str(c),
                        "-o", str(obj)], check=True, capture_output=True, text=True)
        objects.append(obj)
    cxx = ["arm-none-eabi-g++", "-std=gnu++11", "-Os", "-fno-exceptions", "-fno-rtti", *cpu, *warn,
           f"-I{stand_in}", f"-I{lib / 'src'}", f"-I{sketch}"]
    for src, obj in ((tmp_path / "classify.ino.cpp", tmp_path / "sketch.o"),
                     (stand_in / "stand_in_main.cpp", tmp_path / "stand_in.o")):
        proc = subprocess.run([*cxx, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        objects.append(obj)
    # Linking catches what compiling alone would not: a C API the C++ sketch cannot reach (extern "C").
    # gcc links: the sketch needs no C++ runtime (no exceptions, RTTI or constructors that run code).
    proc = subprocess.run(["arm-none-eabi-gcc", *cpu, "--specs=nano.specs", "--specs=nosys.specs", "-o",
                           str(tmp_path / "sketch.elf"), *map(str, objects)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# -- Make ---------------------------------------------------------------------------------------------

def test_make_fragment_builds_a_host_application(cnn_graph, samples, tmp_path):
    lib = tmp_path / "edgekit_model"
    generate_library(cnn_graph, lib, "host")
    app = tmp_path / "app"
    _write_app(app, samples, {"main.c": HOST_MAIN, "Makefile": (
        f"include {lib}/edgekit_model.mk\n"
        "CFLAGS += -std=c99 -Wall -Wextra -Werror -O1 $(EDGEKIT_MODEL_CFLAGS)\n"
        "user_app: main.c app.c $(EDGEKIT_MODEL_SOURCES)\n"
        "\t$(CC) $(CFLAGS) -o $@ $^ $(EDGEKIT_MODEL_LDLIBS)\n")})
    proc = subprocess.run(["make", "-s", "-C", str(app)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run = subprocess.run([str(app / "user_app")], capture_output=True, text=True, timeout=60)
    assert run.stdout.splitlines() == _expected_lines(samples)


# -- manifests ----------------------------------------------------------------------------------------

# Arduino library specification (arduino.github.io/arduino-cli/latest/library-specification).
ARDUINO_REQUIRED = {"name", "version", "author", "maintainer", "sentence", "paragraph", "category", "url",
                    "architectures"}
ARDUINO_OPTIONAL = {"depends", "dot_a_linkage", "includes", "precompiled", "ldflags"}
ARDUINO_CATEGORIES = {"Display", "Communication", "Signal Input/Output", "Sensors", "Device Control", "Timing",
                      "Data Storage", "Data Processing", "Other"}
# PlatformIO library.json (docs.platformio.org/en/latest/manifests/library-json/).
PLATFORMIO_FIELDS = {"name", "version", "description", "keywords", "repository", "authors", "license", "homepage",
                     "frameworks", "platforms", "headers", "examples", "dependencies", "export", "build", "scripts",
                     "system", "owner", "private"}
PLATFORMIO_BUILD = {"flags", "unflags", "includeDir", "srcDir", "srcFilter", "extraScript", "libArchive",
                    "libLDFMode", "libCompatMode", "builder"}
# Zephyr module.yml (docs.zephyrproject.org/latest/develop/modules.html).
ZEPHYR_FIELDS = {"name", "build", "security", "package-managers", "blobs"}
ZEPHYR_BUILD = {"cmake", "kconfig", "cmake-ext", "kconfig-ext", "sysbuild-cmake", "sysbuild-kconfig",
                "sysbuild-cmake-ext", "sysbuild-kconfig-ext", "settings", "depends"}


@pytest.fixture(scope="module")
def library_dir(cnn_graph, tmp_path_factory):
    lib = tmp_path_factory.mktemp("manifests") / "edgekit_model"
    generate_library(cnn_graph, lib, "mps2-an386")
    return lib


def test_arduino_library_properties(library_dir):
    fields = {}
    for line in (library_dir / "library.properties").read_text().splitlines():
        key, sep, value = line.partition("=")
        assert sep and key and value.strip(), line
        assert key not in fields
        fields[key] = value
    assert ARDUINO_REQUIRED <= set(fields) <= ARDUINO_REQUIRED | ARDUINO_OPTIONAL
    assert fields["category"] in ARDUINO_CATEGORIES
    assert all(c.isalnum() or c in " _.-" for c in fields["name"]) and fields["name"][0].isalnum()
    assert all(part.isdigit() for part in fields["version"].split(".")) and fields["version"].count(".") == 2
    for header in fields["includes"].split(","):
        assert (library_dir / "src" / header.strip()).exists()
    for example in (library_dir / "examples").iterdir():  # each example folder holds <folder>.ino
        assert (example / f"{example.name}.ino").exists()


def test_platformio_library_json(library_dir):
    manifest = json.loads((library_dir / "library.json").read_text())
    assert {"name", "version"} <= set(manifest) <= PLATFORMIO_FIELDS
    assert manifest["name"] == "edgekit_model"
    assert set(manifest["build"]) <= PLATFORMIO_BUILD
    assert (library_dir / manifest["build"]["srcDir"] / "model.c").exists()
    assert (library_dir / manifest["build"]["includeDir"] / manifest["headers"]).exists()
    assert all((library_dir / e).exists() for e in manifest["examples"])
    assert "-mfloat-abi=hard" in manifest["build"]["flags"]


def test_zephyr_module(library_dir):
    yaml = pytest.importorskip("yaml")
    module = yaml.safe_load((library_dir / "zephyr" / "module.yml").read_text())
    assert set(module) <= ZEPHYR_FIELDS and module["name"] == "edgekit_model"
    assert set(module["build"]) <= ZEPHYR_BUILD
    cmake = (library_dir / module["build"]["cmake"] / "CMakeLists.txt").read_text()
    assert "if(CONFIG_EDGEKIT_MODEL)" in cmake and "zephyr_library_sources" in cmake
    for source in cmake.split("zephyr_library_sources(")[1].split(")")[0].split():
        assert (library_dir / "zephyr" / source.replace("${CMAKE_CURRENT_LIST_DIR}/", "")).resolve().exists()
    assert "config EDGEKIT_MODEL\n" in (library_dir / module["build"]["kconfig"]).read_text()


def test_library_is_not_built_or_flashed_by_edgekit(library_dir):
    with pytest.raises(EdgekitError, match="is a library"):
        api.build(library_dir)
    from edgekit.device.flash import flash_project
    with pytest.raises(EdgekitError, match="is a library"):
        flash_project(library_dir, "socket://127.0.0.1:1")


def test_cli_generate_library(tmp_path, cnn_graph, digits):
    import sys
    from edgekit.export.tflite import export_tflite
    model = tmp_path / "model.tflite"
    export_tflite(cnn_graph, model)
    np.save(tmp_path / "calib.npy", digits.x_test[:2].transpose(0, 2, 3, 1))  # a .tflite takes NHWC
    proc = subprocess.run([sys.executable, "-m", "edgekit.cli", "generate", str(model), "--board", "mps2-an386",
                           "--library", "--calib", str(tmp_path / "calib.npy"), "-o", str(tmp_path / "lib")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "add_subdirectory" in proc.stdout
    assert (tmp_path / "lib" / "src" / "edgekit_model.h").exists()
    values = (tmp_path / "lib" / "examples" / "classify" / "example_input.h").read_text().count("f,")
    assert values == 64  # the first calibration sample, 8 x 8


def test_weight_only_library_runs_float_through_the_same_api(digits, tmp_path):
    """A weight-only model: float activations, the quantize / dequantize helpers copy."""
    import torch
    torch.manual_seed(4)
    graph = api.quantize(models.DigitsCNN().eval(), digits.x_train[:16], weight_only=True)
    lib = tmp_path / "edgekit_model"
    generate_library(graph, lib, "host")
    header = (lib / "src" / "edgekit_model.h").read_text()
    assert "#define EK_MODEL_WEIGHT_ONLY 1" in header and "float *ek_model_input(int32_t index);" in header
    x = digits.x_test[:SAMPLES]
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).astype(np.float32)
    app = tmp_path / "app"
    app.mkdir()
    (app / "samples.h").write_text(_inputs_header({"x": nhwc}))
    (app / "main.c").write_text(r"""
#include <stdio.h>
#include "edgekit_model.h"
#include "samples.h"
int main(void)
{
    static float scores[EK_MODEL_OUTPUT0_SIZE];
    ek_model_init();
    for (int s = 0; s < SAMPLES; ++s) {
        if (ek_model_quantize_input(0, samples[s], SAMPLE_SIZE) != 0) return 2;
        ek_model_invoke();
        ek_model_dequantize_output(0, scores, EK_MODEL_OUTPUT0_SIZE);
        for (int i = 0; i < EK_MODEL_OUTPUT0_SIZE; ++i) printf("%.9g ", (double)scores[i]);
        printf("%d\n", (int)ek_model_output_argmax(0));
    }
    return 0;
}
""")
    sources = [str(p) for p in sorted((lib / "src").rglob("*.c"))]
    subprocess.run(["cc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-O1", *SANITIZE, f"-I{lib / 'src'}", "-o",
                    str(app / "user_app"), str(app / "main.c"), *sources, "-lm"], check=True)
    out = subprocess.run([str(app / "user_app")], capture_output=True, text=True, timeout=60, check=True).stdout
    rows = np.array([[float(v) for v in line.split()] for line in out.splitlines()])
    want = api.reference_run(graph, x)
    np.testing.assert_allclose(rows[:, :-1], want, rtol=1e-4, atol=1e-4)  # float kernels: as test_models_c
    assert (rows[:, -1] == np.argmax(rows[:, :-1], axis=1)).all()


@needs_cmake
@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None or shutil.which("qemu-aarch64") is None,
                    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (make setup)")
def test_cmake_raspberry_pi_5_application_equals_the_reference(cnn_graph, samples, tmp_path):
    """The Pi 5 library (NEON + SDOT kernels) cross-built through CMake, run under qemu-aarch64."""
    lib = tmp_path / "edgekit_model"
    generate_library(cnn_graph, lib, "rpi5")
    app = tmp_path / "app"
    _write_app(app, samples, {"main.c": HOST_MAIN, "CMakeLists.txt": HOST_CMAKE.format(lib=lib)})
    _cmake_build(app, tmp_path / "build", "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc", "-DCMAKE_SYSTEM_NAME=Linux",
                 "-DCMAKE_SYSTEM_PROCESSOR=aarch64", "-DCMAKE_C_FLAGS=-std=c99 -Wall -Wextra -Werror")
    proc = subprocess.run(["qemu-aarch64", "-cpu", "cortex-a76", "-L", "/usr/aarch64-linux-gnu",
                           str(tmp_path / "build" / "user_app")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == _expected_lines(samples)

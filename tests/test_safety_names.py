"""Hostile names (issue 11, class 1): tensor / layer names from a .tflite and module paths from a .pt2
reach generated C only through the c_comment / c_string filters, so a name can neither add C nor
break the build; the original names stay, JSON-escaped, in edgekit_project.json."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgekit
from edgekit.codegen.render import NAME_CHARS, c_comment, c_string

from helpers import WARN, float_graph, quantize_with_random_data

EDGEKIT = [sys.executable, "-m", "edgekit.cli"]
EXAMPLES = int(os.environ.get("EDGEKIT_NAME_EXAMPLES", "12"))

# Each of these, pasted raw into a comment or string, would run code, break the build, or splice lines.
HOSTILE = [
    '*/ __attribute__((constructor)) static void pwn(void) { fclose(fopen("PWNED", "w")); } /*',
    '"; static int pwned = 1; static const char *x = "',
    'a\n#include "/etc/passwd"\nb',
    "ends in a backslash \\",
    "trigraph ??/\nsplice",
    "nested /* comment",
    "line // comment \\\n continued",
    "caf\u00e9 \u2603 \U0001F600 \x00 nul \x1b[31m escape",
    "x" * 5000,
    "%s%n%x format",
]

# Characters that mean something to C, the preprocessor, JSON or a shell, plus any Unicode.
_PIECES = st.sampled_from(list('*/\\"\'\n\r\t?#<>%{}();$`\x00\x7f') + ["*/", "/*", "??/", "??=", "\\\n"])
NAME = st.lists(_PIECES | st.characters(), max_size=40).map("".join)
NAMES = st.lists(NAME, min_size=1, max_size=25)


def _compile_and_read_back(names: list[str], tmp: Path) -> list[bytes]:
    """A C file holding every name in a comment and in a string literal, compiled with the project's
    warnings as errors and run: prints each string's bytes as hex, one line each."""
    body = "\n".join(f"/* {c_comment(n)} */\n    \"{c_string(n)}\"," for n in names)
    src = tmp / "names.c"
    src.write_text('#include <stdio.h>\n#include <string.h>\nstatic const char *const names[] = {\n    '
                   + body + '\n};\nint main(void) {\n'
                   '    for (unsigned i = 0; i < sizeof names / sizeof names[0]; i++) {\n'
                   '        const char *s = names[i]; size_t n = strlen(s);\n'
                   '        for (size_t k = 0; k < n; k++) printf("%02x", (unsigned char)s[k]);\n'
                   '        printf("\\n");\n    }\n    return 0;\n}\n')
    exe = tmp / "names"
    proc = subprocess.run(["gcc", *WARN, "-Wtrigraphs", "-Wcomment", str(src), "-o", str(exe)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, cwd=tmp, timeout=30, check=True).stdout
    return [bytes.fromhex(line) for line in out.splitlines()]


def _expected_bytes(name: str) -> bytes:
    shown = name if len(name) <= NAME_CHARS else name[:NAME_CHARS] + "..."
    return shown.encode("utf-8", "surrogatepass").split(b"\x00")[0]  # C strings end at the first NUL


def _assert_safe_comment(text: str):
    assert all(" " <= c <= "~" for c in text) and "\\" not in text
    for pair in ("*/", "/*", "??"):
        assert pair not in text


def test_hostile_names_compile_and_read_back(tmp_path):
    got = _compile_and_read_back(HOSTILE, tmp_path)
    assert got == [_expected_bytes(n) for n in HOSTILE]
    assert not (tmp_path / "PWNED").exists()
    for n in HOSTILE:
        _assert_safe_comment(c_comment(n))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(names=NAMES)
def test_any_names_compile_and_read_back(names, tmp_path):
    """Whatever the names, the C compiles with -Wall -Wextra -Werror and each string literal holds
    exactly the name's UTF-8 bytes (shortened past NAME_CHARS)."""
    assert _compile_and_read_back(names, tmp_path) == [_expected_bytes(n) for n in names]
    for n in names:
        _assert_safe_comment(c_comment(n))


@settings(max_examples=2000, deadline=None, derandomize=True)
@given(st.lists(_PIECES | st.characters(), max_size=150).map("".join))
def test_filters_output_only_safe_text(name):
    """Many more names, without a compiler: the comment text has no delimiter, trigraph or
    non-printable character, and the string contents have no raw quote, backslash run or newline."""
    _assert_safe_comment(c_comment(name))
    s = c_string(name)
    assert all(" " <= c <= "~" for c in s)
    i = 0
    while i < len(s):  # every backslash starts a complete escape; no bare quote or '?'
        if s[i] == "\\":
            assert s[i + 1] in '\\"?' or s[i + 1:i + 4].isdigit()
            i += 2 if s[i + 1] in '\\"?' else 4
        else:
            assert s[i] not in '"?'
            i += 1


def _hostile_graph(names: list[str]):
    """fully_connected -> relu -> fully_connected, with hostile op and tensor names."""
    from edgekit.ir import Graph, Op, Tensor
    rng = np.random.default_rng(1)
    g = Graph()
    t_in, t_h, t_r, t_out = names[0] + " in", names[1], names[2] + " relu", names[3] + " out"
    g.add_tensor(Tensor(t_in, (1, 6)))
    g.inputs.append(t_in)
    g.source_layouts[t_in] = "NHWC"
    for w, shape in ((names[4] + " w1", (5, 6)), (names[5] + " w2", (3, 5))):
        g.add_tensor(Tensor(w, shape, "float32", rng.normal(0, 1, shape).astype(np.float32)))
    g.add_tensor(Tensor(t_h, (1, 5)))
    g.add_tensor(Tensor(t_r, (1, 5)))
    g.add_tensor(Tensor(t_out, (1, 3)))
    g.outputs.append(t_out)
    g.source_layouts[t_out] = "NHWC"
    g.ops.append(Op("fully_connected", names[6], [t_in, names[4] + " w1"], [t_h], {"activation": "none"}))
    g.ops.append(Op("relu", names[7], [t_h], [t_r], {}))
    g.ops.append(Op("fully_connected", names[8], [t_r, names[5] + " w2"], [t_out], {"activation": "none"}))
    return quantize_with_random_data(g, rng)


def _check_project(out: Path, names_expected: list[str]):
    """Built with its own Makefile (-Werror) and run through edgekit: bit-exact, nothing injected ran,
    no stray preprocessor line, and the project record keeps the original names."""
    edgekit.build(out)
    x = np.random.default_rng(2).uniform(-1, 1, (8, 6)).astype(np.float32)
    cwd = os.getcwd()
    os.chdir(out)  # a constructor that ran would leave PWNED in the working directory
    try:
        y = edgekit.run(out, x)
    finally:
        os.chdir(cwd)
    graph_names = json.loads((out / "edgekit_project.json").read_text())["layers"]
    assert [l["name"] for l in graph_names] == names_expected
    assert not (out / "PWNED").exists()
    for f in ("model.c", "model_weights.c"):
        includes = [l for l in (out / f).read_text().splitlines() if l.lstrip().startswith("#")]
        assert all(l.startswith(("#include \"", "#include <", "#ifndef EK_", "#define EK_", "#endif")) and
                   "passwd" not in l for l in includes), includes
    return y


def test_hostile_names_in_a_generated_project(tmp_path):
    names = (HOSTILE * 2)[:9]
    g = _hostile_graph(names)
    out = tmp_path / "out"
    edgekit.generate(g, out, board="host")
    assert [op.name for op in g.ops][-1] == names[8]
    y = _check_project(out, [op.name for op in g.ops])
    x = np.random.default_rng(2).uniform(-1, 1, (8, 6)).astype(np.float32)
    assert np.array_equal(y, edgekit.reference_run(g, x))


def test_hostile_names_through_a_tflite_file(tmp_path):
    """The .tflite reader hands tensor names on as they are; the project built from it is safe."""
    from edgekit.frontends.tflite import load_tflite
    names = [HOSTILE[i] for i in (0, 2, 1, 3, 5, 4, 6, 7, 9)]
    g = _hostile_graph(names)
    path = edgekit.export_tflite(g, tmp_path / "evil.tflite", io="int8")
    loaded = load_tflite(path)
    assert {names[0] + " in", names[3] + " out"} <= set(loaded.tensors)  # the names survived the file
    out = tmp_path / "out"
    edgekit.generate(loaded, out, board="host")
    _check_project(out, [op.name for op in loaded.ops])


def test_hostile_module_paths_through_a_pt2(tmp_path):
    """PyTorch module paths (as torch.export keeps them) in a .pt2, through the command line."""
    import torch
    from torch import nn

    paths = ['a*/x/*b', 'q"\\"r\\', '#include<stdio_h>', 'caf\u00e9??/', "*/pwned=1/*"]  # torch.export keeps these

    class Evil(nn.Module):
        def __init__(self):
            super().__init__()
            for i, p in enumerate(paths):
                self.add_module(p, nn.Linear(4, 4))

        def forward(self, x):
            for p in paths:
                x = torch.relu(getattr(self, p)(x))
            return x

    ep = torch.export.export(Evil().eval(), (torch.randn(1, 4),))
    torch.export.save(ep, tmp_path / "evil.pt2")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32))
    out = tmp_path / "out"
    proc = subprocess.run(EDGEKIT + ["generate", str(tmp_path / "evil.pt2"), "--calib", str(tmp_path / "calib.npy"),
                                     "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "edgekit_project.json").read_text())
    assert [l["name"] for l in record["layers"] if l["kind"] == "fully_connected"] == paths
    proc = subprocess.run(EDGEKIT + ["build", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [l.strip() for l in (out / "model.c").read_text().splitlines() if "pwned=1" in l]
    assert lines and all(l.startswith('"') or (l.startswith("/* Layer") and "* /pwned=1/ *" in l) for l in lines)


def test_names_printed_to_a_terminal_are_escaped(tmp_path):
    """`edgekit inspect` on a terminal (a real pty): an ESC sequence in a name arrives escaped."""
    import pty
    g = _hostile_graph([f"\x1b]0;retitled\x07\x1b[31mred{i}" for i in range(9)])
    path = edgekit.export_tflite(g, tmp_path / "esc.tflite", io="int8")
    master, slave = pty.openpty()
    proc = subprocess.Popen(EDGEKIT + ["inspect", str(path)], stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    os.close(master)
    out = b"".join(chunks)
    assert b"red" in out and b"\x1b" not in out and b"\x07" not in out
    assert b"\\x1b[31m" in out

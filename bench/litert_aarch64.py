"""TensorFlow Lite (LiteRT) + XNNPACK on the emulated Raspberry Pi CPUs: an arm64 Python with ai-edge-litert
under qemu-aarch64, and its executed instructions per inference.

    .venv/bin/python bench/litert_aarch64.py [--cache DIR] MODEL.tflite ...   # counts on both CPUs

The first call builds a private arm64 sysroot in the cache (default $EDGEKIT_CACHE or ~/.cache/edgekit,
then litert-aarch64/; ~70 MB, a minute with a fast network), without touching the system's dpkg:
- `apt-get download` of Debian bookworm's arm64 python3.11 and the packages it depends on, through a
  private apt configuration (APT::Architecture=arm64, its own state, cache and sources list), unpacked
  with `dpkg -x`;
- `pip download --platform manylinux2014_aarch64 --python-version 3.11` of numpy 1.26.4 and
  ai-edge-litert 2.3.0 (the wheels alone: the interpreter needs no other package), unzipped onto its
  PYTHONPATH;
- a Pi-like /proc/cpuinfo inside the sysroot, rewritten for each CPU: qemu-user shows the host's x86
  cpuinfo, `-L` remaps /proc/cpuinfo too, and LiteRT's CPU detection crashes on the x86 one.

Counting (bench/qemu_insn_count.c with start/stop): the instructions from the entry of
tflite::Subgraph::Invoke() to its `ret` (addresses from the library's symbol table plus its load address,
which a probe run reads from /proc/self/maps: it is fixed under qemu-user), so Python around the call is
not counted; the last of 3 invocations on one input (the first sets XNNPACK up), checked equal to the
second. `num_threads=1`, PYTHONHASHSEED=0, OPENBLAS_NUM_THREADS=1. "builtin" = LiteRT's own kernels
(BUILTIN_WITHOUT_DEFAULT_DELEGATES). Instructions are not time.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
ROOTS = ["python3.11", "libstdc++6"]  # everything else is their dependency closure
WHEELS = ["numpy==1.26.4", "ai-edge-litert==2.3.0"]
PYTHON = "usr/bin/python3.11"
LIBRARY = "ai_edge_litert/libpywrap_litert_common.so"
INVOKE = "_ZN6tflite8Subgraph6InvokeEv"  # tflite::Subgraph::Invoke()
# What qemu 7.2 reports for the two cores (the features its -cpu models have), as a Pi's kernel would.
CPUINFO = {"cortex-a72": ("0x0", "0xd08", "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"),
           "cortex-a76": ("0x4", "0xd0b", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                                          "asimdrdm lrcpc dcpop asimddp")}


def default_cache() -> Path:
    base = os.environ.get("EDGEKIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                           os.path.expanduser("~/.cache"), "edgekit")
    return Path(base) / "litert-aarch64"


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:3]))} ... failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout


def build_sysroot(cache: Path) -> Path:
    """The arm64 sysroot with Python, numpy and ai-edge-litert (built once; `done` marks a finished one)."""
    root, site = cache / "root", cache / "site"
    if (cache / "done").exists():
        return cache
    for d in ("apt", "root", "site", "debs", "wheels"):
        shutil.rmtree(cache / d, ignore_errors=True)
    apt = cache / "apt"
    for d in ("state/lists/partial", "cache/archives/partial", "etc"):
        (apt / d).mkdir(parents=True)
    (apt / "state/status").touch()
    (apt / "etc/sources.list").write_text(f"deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                                          f"{MIRROR} {SUITE} main\n")
    opts = ["-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64", "-o", f"Dir::State={apt}/state",
            "-o", f"Dir::State::status={apt}/state/status", "-o", f"Dir::Cache={apt}/cache",
            "-o", f"Dir::Etc::SourceList={apt}/etc/sources.list", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", "Debug::NoLocking=1"]
    print(f"building the arm64 sysroot in {cache}", file=sys.stderr)
    _run(["apt-get", *opts, "update"])
    deps = _run(["apt-cache", *opts, "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                 "--no-breaks", "--no-replaces", "--no-enhances", *ROOTS])
    packages = sorted({l.strip() for l in deps.splitlines() if l and not l.startswith(" ") and not l.startswith("<")})
    debs = cache / "debs"
    debs.mkdir()
    _run(["apt-get", *opts, "download", *packages], cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(root)])
    wheels = cache / "wheels"
    _run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps", "--platform",
          "manylinux2014_aarch64", "--platform", "manylinux_2_27_aarch64", "--python-version", "3.11", "-d", str(wheels),
          *WHEELS])
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
    if not (root / PYTHON).exists() or not (site / LIBRARY).exists():
        raise SystemExit(f"{cache}: no {PYTHON} or {LIBRARY} after the downloads")
    (cache / "done").write_text(" ".join(packages + WHEELS) + "\n")
    return cache


def set_cpu(cache: Path, cpu: str) -> None:
    variant, part, features = CPUINFO[cpu]
    (cache / "root/proc").mkdir(exist_ok=True)
    (cache / "root/proc/cpuinfo").write_text(
        f"processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
        f"CPU architecture: 8\nCPU variant\t: {variant}\nCPU part\t: {part}\nCPU revision\t: 1\n\n")


def invoke_window(cache: Path) -> tuple[int, int]:
    """Offsets in the library of Subgraph::Invoke()'s entry and of its one `ret`."""
    lib = cache / "site" / LIBRARY
    syms = _run(["aarch64-linux-gnu-nm", "-S", str(lib)])
    m = re.search(rf"^([0-9a-f]+) ([0-9a-f]+) t {INVOKE}$", syms, re.M)
    if not m:
        raise SystemExit(f"{lib}: no symbol {INVOKE}")
    start, size = int(m.group(1), 16), int(m.group(2), 16)
    dis = _run(["aarch64-linux-gnu-objdump", "-d", f"--start-address={start:#x}", f"--stop-address={start + size:#x}",
                str(lib)])
    rets = [int(a, 16) for a in re.findall(r"^\s*([0-9a-f]+):\s+d65f03c0\s+ret", dis, re.M)]
    if len(rets) != 1:
        raise SystemExit(f"{lib}: {INVOKE} has {len(rets)} ret instructions, the counter needs exactly one")
    return start, rets[0]


def _guest(cache: Path, cpu: str, args: list[str], plugin: list[str], env: dict) -> str:
    set_cpu(cache, cpu)
    env = {"PYTHONPATH": str(cache / "site"), "PYTHONHASHSEED": "0", "OPENBLAS_NUM_THREADS": "1", **env}
    # setarch -R: the host's address-space randomization off, so that the library loads where the
    # probe saw it (qemu-user maps the guest with the host's mmap; with randomization on, runs differ)
    norandom = ["setarch", os.uname().machine, "-R"] if shutil.which("setarch") else []
    cmd = [*norandom, "qemu-aarch64", "-cpu", cpu, "-L", str(cache / "root"), *plugin, str(cache / "root" / PYTHON),
           str(HERE / "litert_aarch64_guest.py"), *args]
    return _run(cmd, env=env, timeout=3600)


def build_plugin(dest: Path) -> Path:
    so = dest / "qemu_insn_count.so"
    _run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(so), str(HERE / "qemu_insn_count.c")])
    return so


class Counter:
    """Counts LiteRT's instructions per inference on one CPU model."""

    def __init__(self, cache: Path, plugin: Path, tmp: Path):
        self.cache, self.plugin, self.tmp = build_sysroot(cache), plugin, tmp
        self.start, self.stop = invoke_window(self.cache)
        self.bases = {}

    def plugin_args(self, base: int, log: Path) -> list[str]:
        return ["-plugin", f"{self.plugin},start={base + self.start:#012x},stop={base + self.stop:#012x}", "-d", "plugin",
                "-D", str(log)]

    def base(self, cpu: str) -> int:
        """Where the library loads. qemu-user places guest mappings with the host's mmap, so the probe
        runs with the same plugin, arguments of the same lengths and the same environment as the
        counting runs (the counting run checks it landed there)."""
        if cpu not in self.bases:
            placeholder = 0x5500000000
            out = _guest(self.cache, cpu, ["probe", "xnnpack", "3", str(self.tmp / "probe.npy")],
                         self.plugin_args(placeholder, self.tmp / "probe.txt"), {"EK_LITERT_BASE": f"{placeholder:#x}"})
            self.bases[cpu] = int(re.search(r"base (0x[0-9a-f]+)", out).group(1), 16)
        return self.bases[cpu]

    def count(self, model: Path, cpu: str, mode: str = "xnnpack") -> tuple[int, np.ndarray]:
        """(instructions of one steady-state inference, the outputs of the 3 invocations)."""
        base = self.base(cpu)
        log, out = self.tmp / f"litert_{cpu}_{mode}.txt", self.tmp / f"litert_{cpu}_{mode}.npy"
        _guest(self.cache, cpu, [str(model), mode, "3", str(out)], self.plugin_args(base, log),
               {"EK_LITERT_BASE": f"{base:#x}"})
        windows = [l for l in log.read_text().splitlines() if l.startswith("windows")]
        counts = [int(v) for v in windows[-1].split()[1:]] if windows else []
        if len(counts) != 3:
            raise SystemExit(f"{model.name} on {cpu}: {len(counts)} Subgraph::Invoke() windows counted, not 3")
        if counts[1] != counts[2]:
            print(f"  note: {model.name} {cpu} {mode}: invocations 2 and 3 differ ({counts[1]} vs {counts[2]})",
                  file=sys.stderr)
        return counts[2], np.load(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--builtin", action="store_true", help="also count LiteRT's builtin kernels")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        counter = Counter(args.cache, build_plugin(Path(tmp)), Path(tmp))
        for model in args.models:
            for cpu in CPUINFO:
                for mode in ["xnnpack"] + (["builtin"] if args.builtin else []):
                    n, _ = counter.count(model, cpu, mode)
                    print(f"{model.name} {cpu} {mode}: {n:,} instructions per inference")


if __name__ == "__main__":
    main()

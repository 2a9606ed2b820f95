"""Fuzz edgekit's model loaders (.tflite, .pt2) and the C name escaping with mutated inputs.

    .venv/bin/python bench/fuzz_loaders.py [seconds per target] [seed]

Every mutant must either load or be refused with an EdgekitError; anything else (another exception, a
pickle payload that ran, a generated name that breaks -Werror C) is a finding. tests/test_fuzz_loaders.py
runs each target for a few seconds; this script runs them longer and prints counts for docs/SECURITY.md.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 16))):
        op = rng.randrange(6)
        if not b:
            break
        i = rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.choice((0, 0xFF, 0x7F, 0x80, 1, rng.randrange(256)))
        elif op == 2:
            del b[i:i + rng.randrange(1, 64)]
        elif op == 3:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        elif op == 4:
            b = b[:i]
        else:  # an int32 field set to an extreme (shapes, offsets, counts)
            b[i:i + 4] = rng.choice((0, -1, 2**31 - 1, -2**31, 2**16)).to_bytes(4, "little", signed=True)
    return bytes(b)


def _mutate_pt2(rng: random.Random, data: bytes, marker: Path) -> bytes:
    """Archive-level edits (members, configs, pickles) or raw byte damage."""
    if rng.random() < 0.4:
        return _mutate_bytes(rng, data)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    names = list(members)
    root = names[0].split("/", 1)[0]
    op = rng.randrange(7)
    if op == 0:  # flag a weight as pickled and put a payload there
        cfg = f"{root}/data/weights/model_weights_config.json"
        c = json.loads(members[cfg])
        for meta in c["config"].values():
            meta["use_pickle"] = True
            members[f"{root}/data/weights/{meta['path_name']}"] = pickle.dumps(_Payload(marker))
        members[cfg] = json.dumps(c).encode()
    elif op == 1:  # a member with a payload under some name
        where = rng.choice(("data/sample_inputs/model.pt", "data/weights/model.pt", "data/constants/opaque_obj_0",
                            "data/aotinductor/model/x.so", "extra/x", "../escape", "version"))
        members[f"{root}/{where}" if not where.startswith("..") and where != "version" else where] = \
            pickle.dumps(_Payload(marker))
    elif op == 2:  # drop a member
        members.pop(rng.choice(names))
    elif op == 3:  # damage one member's bytes (stored again with a matching CRC)
        k = rng.choice(names)
        members[k] = _mutate_bytes(rng, members[k])
    elif op == 4:  # JSON edits in the graph or configs
        k = rng.choice([n for n in names if n.endswith(".json")])
        try:
            doc = json.loads(members[k])
            text = json.dumps(doc)
            i = rng.randrange(len(text))
            text = text[:i] + rng.choice(('"', "}", "-1", "1e309", "null", "[]", "\\u0000")) + text[i + 1:]
            members[k] = text.encode()
        except ValueError:
            pass
    elif op == 5:  # a second root folder
        members[f"other/{rng.choice(names).split('/', 1)[1]}"] = b"x"
    else:  # rename a member
        k = rng.choice(names)
        members[k + rng.choice(("x", "/", "_0"))] = members.pop(k)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for k, v in members.items():
            z.writestr(k, v)
    return out.getvalue()


def _seeds(kind: str, work: Path):
    """Small valid files to mutate: a conv + fc .tflite (float I/O) and an int8-I/O one; a conv + fc .pt2."""
    if kind == "pt2":
        import torch
        from torch import nn
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
        torch.export.save(torch.export.export(model, (torch.randn(1, 1, 6, 6),)), work / "seed.pt2")
        return (work / "seed.pt2").read_bytes()
    import edgekit
    from helpers import float_graph, quantize_with_random_data, tiny_quantized_fc
    rng = np.random.default_rng(0)
    conv = float_graph("conv2d", [(1, 6, 6, 1)], dict(stride=(1, 1), dilation=(1, 1), padding=(0, 0, 0, 0),
                                                      activation="relu"),
                       {"w": rng.normal(0, 1, (2, 3, 3, 1)), "b": rng.normal(0, 1, (2,))}, (1, 4, 4, 2))
    tfl = edgekit.export_tflite(quantize_with_random_data(conv, rng), work / "seed.tflite", io="float")
    tfl8 = edgekit.export_tflite(tiny_quantized_fc(), work / "seed8.tflite", io="int8")
    return [tfl.read_bytes(), tfl8.read_bytes()]


def fuzz_loader(kind: str, seconds: float, seed: int = 0, work: Path | None = None, max_runs: int | None = None) -> dict:
    """Mutate seed files of ``kind`` ("pt2" or "tflite") and load each with edgekit.load."""
    import warnings

    import edgekit
    from edgekit.errors import EdgekitError

    warnings.simplefilter("ignore")  # numpy casts of mutated scales, torch's pickle-protocol notes
    own = work is None
    tmp = tempfile.TemporaryDirectory() if own else None
    work = Path(tmp.name) if own else work
    try:
        seeds = _seeds(kind, work)
        rng = random.Random(seed)
        marker = work / "PWNED"
        stats = {"kind": kind, "runs": 0, "loaded": 0, "refused": 0, "findings": [], "payload_ran": False}
        path = work / f"mutant.{kind}"
        end = time.monotonic() + seconds
        while time.monotonic() < end and (max_runs is None or stats["runs"] < max_runs):
            if kind == "pt2":
                data = _mutate_pt2(rng, seeds, marker)
            else:
                data = _mutate_bytes(rng, rng.choice(seeds))
            path.write_bytes(data)
            stats["runs"] += 1
            try:
                graph = edgekit.load(path)
                stats["loaded"] += 1
                if graph.is_quantized():  # and what loads must generate, or be refused clearly
                    edgekit.generate(graph, work / "project", board="host", force=True)
                    stats["generated"] = stats.get("generated", 0) + 1
            except EdgekitError:
                stats["refused"] += 1
            except Exception as exc:  # a finding: not a clear refusal
                stats["findings"].append((type(exc).__name__, str(exc)[:300],
                                          traceback.format_exc().splitlines()[-3:]))
                (work / f"finding-{len(stats['findings'])}.{kind}").write_bytes(data)
            if marker.exists():
                stats["payload_ran"] = True
                break
        return stats
    finally:
        if own:
            tmp.cleanup()


def fuzz_names(seconds: float, seed: int = 0, batch: int = 200) -> dict:
    """Random names through c_comment / c_string, compiled with -Wall -Wextra -Werror and read back."""
    from edgekit.codegen.render import NAME_CHARS, c_comment, c_string

    rng = random.Random(seed)
    pieces = list('*/\\"\'\n\r\t?#<>%{}();$`\x00\x7f') + ["*/", "/*", "??/", "??=", "\\\n", "\u00e9", "\u2603",
                                                         "\U0001F600", "\ud800"]
    stats = {"names": 0, "compiles": 0, "findings": []}
    end = time.monotonic() + seconds
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        while time.monotonic() < end:
            names = []
            for _ in range(batch):
                n = rng.choice((0, 1, 5, 20, 100, 300))
                names.append("".join(rng.choice(pieces) if rng.random() < 0.5 else chr(rng.randrange(1, 0x2FFFF))
                                     for _ in range(n)))
            body = "\n".join(f"/* {c_comment(n)} */ \"{c_string(n)}\"," for n in names)
            src = tmp / "names.c"
            src.write_text('#include <stdio.h>\n#include <string.h>\nstatic const char *const names[] = {\n' + body +
                           '\n};\nint main(void) { for (unsigned i = 0; i < sizeof names / sizeof *names; i++) {'
                           ' for (size_t k = 0; k < strlen(names[i]); k++) printf("%02x", (unsigned char)names[i][k]);'
                           ' printf("\\n"); } return 0; }\n', encoding="utf-8", errors="surrogatepass")
            proc = subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-Wtrigraphs", str(src), "-o",
                                   str(tmp / "names")], capture_output=True, text=True)
            stats["compiles"] += 1
            stats["names"] += len(names)
            if proc.returncode != 0:
                stats["findings"].append(("does not compile", proc.stderr[-500:]))
                continue
            lines = subprocess.run([str(tmp / "names")], capture_output=True, text=True, timeout=30).stdout.splitlines()
            for n, line in zip(names, lines):
                shown = n if len(n) <= NAME_CHARS else n[:NAME_CHARS] + "..."
                want = shown.encode("utf-8", "surrogatepass").split(b"\x00")[0]
                if bytes.fromhex(line) != want:
                    stats["findings"].append(("read back differs", repr(n)[:200]))
    return stats


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    import platform
    print(f"fuzz_loaders: {seconds:g} s per target, seed {seed}, {time.strftime('%Y-%m-%d')}, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    for kind in ("tflite", "pt2"):
        s = fuzz_loader(kind, seconds, seed)
        print(f"{kind:7s}: {s['runs']:7d} mutants, {s['loaded']} loaded ({s.get('generated', 0)} generated C), "
              f"{s['refused']} refused clearly, "
              f"{len(s['findings'])} findings, payload ran: {s['payload_ran']}")
        for f in s["findings"][:10]:
            print("   ", f)
    s = fuzz_names(seconds, seed)
    print(f"names  : {s['names']:7d} names in {s['compiles']} -Werror compiles, {len(s['findings'])} findings")
    for f in s["findings"][:10]:
        print("   ", f)


if __name__ == "__main__":
    main()

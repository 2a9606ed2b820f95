"""Save and load an IR graph: JSON for the structure, one .npz for every array.

A generated project keeps its quantized graph (``graph.json`` + ``graph.npz``)
so that `edgekit profile` can check a device's outputs against the reference
long after generation, without the source model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import EdgekitError
from .ir import Graph, Op, QuantParams, Tensor


def _encode(value, arrays: dict, key: str):
    if isinstance(value, np.ndarray):
        arrays[key] = value
        return {"__array__": key}
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, arrays, f"{key}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, arrays, f"{key}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _encode(v, arrays, f"{key}.{k}") for k, v in value.items()}
    return value


def _decode(value, arrays):
    if isinstance(value, dict):
        if "__array__" in value:
            return arrays[value["__array__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, arrays) for v in value["__tuple__"])
        return {k: _decode(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    return value


def save_graph(graph: Graph, directory: str | Path, stem: str = "graph") -> None:
    directory = Path(directory)
    arrays: dict[str, np.ndarray] = {}
    tensors = []
    for i, t in enumerate(graph.tensors.values()):
        rec = {"name": t.name, "shape": list(t.shape), "dtype": t.dtype}
        if t.data is not None:
            rec["data"] = _encode(t.data, arrays, f"t{i}.data")
        if t.quant is not None:
            rec["quant"] = {"scale": _encode(t.quant.scale, arrays, f"t{i}.scale"),
                            "zero_point": _encode(t.quant.zero_point, arrays, f"t{i}.zp"), "axis": t.quant.axis}
        tensors.append(rec)
    ops = [{"kind": op.kind, "name": op.name, "inputs": op.inputs, "outputs": op.outputs,
            "attrs": _encode(op.attrs, arrays, f"op{i}")} for i, op in enumerate(graph.ops)]
    doc = {"edgekit_graph": 1, "tensors": tensors, "ops": ops, "inputs": graph.inputs, "outputs": graph.outputs,
           "source_layouts": graph.source_layouts, "meta": _encode(graph.meta, arrays, "meta")}
    (directory / f"{stem}.json").write_text(json.dumps(doc))
    np.savez_compressed(directory / f"{stem}.npz", **arrays)


def load_graph(directory: str | Path, stem: str = "graph") -> Graph:
    directory = Path(directory)
    path = directory / f"{stem}.json"
    if not path.exists():
        raise EdgekitError(f"{directory} holds no saved graph ({stem}.json); generate the project again")
    try:
        return _load_graph(directory, path, stem)
    except EdgekitError:
        raise
    except Exception as exc:  # a damaged or partial file: any of json, zip, numpy or key errors
        raise EdgekitError(f"the saved graph in {directory} ({stem}.json / {stem}.npz) is damaged "
                           f"({type(exc).__name__}: {str(exc)[:120]}); generate the project again") from None


def _load_graph(directory: Path, path: Path, stem: str) -> Graph:
    doc = json.loads(path.read_text())
    with np.load(directory / f"{stem}.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    g = Graph()
    for rec in doc["tensors"]:
        quant = None
        if "quant" in rec:
            q = rec["quant"]
            quant = QuantParams(_decode(q["scale"], arrays), _decode(q["zero_point"], arrays), q["axis"])
        data = _decode(rec["data"], arrays) if "data" in rec else None
        g.add_tensor(Tensor(rec["name"], tuple(rec["shape"]), rec["dtype"], data, quant))
    g.ops = [Op(o["kind"], o["name"], o["inputs"], o["outputs"], _decode(o["attrs"], arrays)) for o in doc["ops"]]
    g.inputs, g.outputs = doc["inputs"], doc["outputs"]
    g.source_layouts = doc["source_layouts"]
    g.meta = _decode(doc["meta"], arrays)
    return g

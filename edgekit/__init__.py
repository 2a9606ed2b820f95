"""edgekit: a trained model to a microcontroller or a Raspberry Pi, measured on the target."""
from .api import build, export_tflite, generate, load, quantize, reference_run, run
from .errors import EdgekitError
from .ir import Graph

__version__ = "0.1.0"
__all__ = ["build", "export_tflite", "generate", "load", "quantize", "reference_run", "run", "EdgekitError", "Graph",
           "cluster", "distill", "factorize", "prune", "qat", "run_recipe", "sensitivity", "sparsify", "add_exits"]

_COMPRESSION = ("cluster", "distill", "factorize", "prune", "qat", "run_recipe", "sensitivity", "sparsify",
                "add_exits")


def __getattr__(name):
    # The compression passes need torch; import them on first use so `import edgekit` stays light.
    if name in _COMPRESSION:
        import importlib

        from .compress import API
        return getattr(importlib.import_module(f".compress.{API[name]}", __name__), name)
    raise AttributeError(f"module 'edgekit' has no attribute {name!r}")

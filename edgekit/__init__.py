"""edgekit: a trained model to a microcontroller or a Raspberry Pi, measured on the target."""
from .api import build, export_tflite, generate, load, quantize, reference_run, run
from .errors import EdgekitError
from .ir import Graph

__version__ = "0.1.0"
__all__ = ["build", "cluster", "export_tflite", "generate", "load", "quantize", "reference_run", "run",
           "EdgekitError", "Graph"]


def __getattr__(name):
    # edgekit.cluster needs torch: imported on first use, so `import edgekit` stays light.
    if name == "cluster":
        from .compress.cluster import cluster
        return cluster
    raise AttributeError(f"module 'edgekit' has no attribute {name!r}")

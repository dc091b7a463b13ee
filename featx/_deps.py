"""Optional dependencies (pyarrow, onnx, onnxruntime): import them, or say in one line which extra installs them."""
from __future__ import annotations

import importlib

from .errors import UsageError

# module -> (pip extra, what it is needed for)
EXTRAS = {
    "onnx": ("export", "writing ONNX files"),
    "onnxscript": ("export", "the torch.onnx dynamo exporter"),
    "onnxruntime": ("export", "running ONNX files"),
    "pyarrow": ("parquet", "Parquet feature stores"),
}


def require(module: str):
    """The imported module, or UsageError naming the featx extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra, why = EXTRAS[module]
        raise UsageError(f"{module} is not installed ({why}); install it with: pip install 'featx[{extra}]'") from exc


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False

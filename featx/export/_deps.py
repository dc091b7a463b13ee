"""Optional dependencies of `featx export`: the helpers live in featx._deps (shared with features/, which never imports export/)."""
from __future__ import annotations

from .._deps import EXTRAS, available, require

__all__ = ["EXTRAS", "available", "require"]

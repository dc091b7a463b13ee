"""Moved to featx.devices (the one place for device, precision, workers and ranks); kept until training imports it there."""
from ..devices import Dist, resolve_device, unwrap  # noqa: F401
from ..devices import setup_distributed as setup  # noqa: F401

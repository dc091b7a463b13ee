"""Shared CLI plumbing: consoles, the --json printer, the error boundary and common option types."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

# stdout carries results (tables, --json); stderr carries progress, warnings and errors.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    """Machine-readable summary on stdout: plain json, one document, nothing else on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    err.print(f"[yellow]Warning:[/yellow] {message}", markup=True)


def show_progress() -> bool:
    """Progress bars only on an interactive terminal (quiet when piped or in CI)."""
    return err.is_terminal and not os.environ.get("FEATX_NO_PROGRESS")

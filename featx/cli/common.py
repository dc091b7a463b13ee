"""Shared CLI plumbing: consoles (markup off: text prints as it is), styled(), warnings, progress, the --json printer."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.text import Text

# stdout carries results (tables, --json); stderr carries progress, warnings and errors.
# The one escaping rule: markup is OFF on both consoles, so every string printed (file names, class names, error
# messages, table cells) appears exactly as it is. featx's own styling goes through `styled()` (or Text objects),
# which escapes each value it interpolates.
# Piped or captured stdout has no width: Rich then assumes 80 columns and cuts table cells to "…" (issue 24.9). A
# terminal keeps its own width, and COLUMNS (which Rich reads) still wins; otherwise tables get room to be whole.
PIPED_WIDTH = 240
out = Console(highlight=False, soft_wrap=True, markup=False,
              width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else PIPED_WIDTH)
err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)  # one error = one line


def styled(template: str, *values: Any) -> Text:
    """featx's own Rich markup in ``template`` with ``{}`` slots; each value is escaped, so it prints literally.

    >>> styled("[bold]{}[/bold] head", "svm [rbf]").plain
    'svm [rbf] head'
    """
    return Text.from_markup(template.format(*(escape(str(v)) for v in values)))


def print_json(data: Any) -> None:
    """Machine-readable summary on stdout: plain json, one document, nothing else on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    err.print(Text.assemble(("Warning: ", "yellow"), str(message)))


def error_line(message: str) -> Text:
    """The one-line ``Error: ...`` featx prints for every error it can explain."""
    return Text.assemble(("Error: ", "bold red"), " ".join(str(message).split("\n")).strip())


def show_progress() -> bool:
    """Progress bars only on an interactive terminal (quiet when piped or in CI)."""
    return err.is_terminal and os.environ.get("FEATX_NO_PROGRESS", "0") in ("", "0")


class progress_bar:
    """Context manager yielding update(done, total): a Rich bar with images/s on a terminal, silent otherwise."""

    def __init__(self, description: str, unit: str = "img"):
        self.description = description
        self.unit = unit
        self._progress = None
        self._task = None

    def __enter__(self):
        if not show_progress():
            return lambda done, total: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err, transient=True,
        )
        self._progress.start()
        import time

        self._t0 = time.perf_counter()
        self._first = None

        def update(done: int, total: int):
            now = time.perf_counter()
            if self._task is None:
                self._task = self._progress.add_task(self.description, total=total, completed=done, rate="")
                self._first = (done, now)
                return
            d0, t0 = self._first
            rate = (done - d0) / (now - t0) if now > t0 else 0.0
            self._progress.update(self._task, completed=done, total=total, rate=f"{rate:,.0f} {self.unit}/s")

        return update

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False


class _ToWarn(logging.Handler):
    """Library warnings (logger 'featx.*') shown as yellow `Warning:` lines on stderr; records marked ``note``
    (``featx.runtime.note``: "preparing the CPU graph...") as plain lines."""

    def filter(self, record):
        return record.levelno >= logging.WARNING or getattr(record, "note", False)

    def emit(self, record):
        if record.levelno < logging.WARNING:
            err.print(record.getMessage())
            return
        warn(record.getMessage())


@contextlib.contextmanager
def library_warnings():
    """Route the library's logging warnings to the CLI's stderr console for the duration of a command."""
    logger = logging.getLogger("featx")
    if any(isinstance(h, _ToWarn) for h in logger.handlers):  # already routed by an outer command scope
        yield
        return
    handler = _ToWarn(level=logging.INFO)
    logger.addHandler(handler)
    old_level, old_propagate = logger.level, logger.propagate
    if logger.getEffectiveLevel() > logging.INFO:  # let notes through; the handler still drops other INFO records
        logger.setLevel(logging.INFO)
    logger.propagate = False  # otherwise Python's last-resort handler prints each warning a second time
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate
        logger.setLevel(old_level)

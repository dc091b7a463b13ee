"""Errors featx raises on purpose: each carries a message that says how to fix the input, and an exit code.

The CLI turns any FeatxError into a one-line ``Error: ...`` on stderr and exits with ``exit_code``;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import signal


class FeatxError(Exception):
    """Base class for every error a user can cause and fix."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(FeatxError):
    """Bad option values or combinations (exit 2, like argument parsing errors)."""

    exit_code = 2


class DataError(FeatxError):
    """The images or labels cannot be used: empty folder, no images, only garbage, bad layout."""

    exit_code = 3


class WeightsError(FeatxError):
    """Backbone weights are missing, unreadable, unsafe or do not fit the architecture."""

    exit_code = 4


class ArtifactError(FeatxError):
    """A features, head or model file is missing, corrupt, unsafe or does not fit (provenance mismatch)."""

    exit_code = 5


class StrictModeError(FeatxError):
    """``--strict`` was given and something was skipped or drifted."""

    exit_code = 6


class OutputError(FeatxError):
    """An output cannot be written: not writable, read-only, disk full, in use by another featx run,
    or a step after the main output (sorting files, a report) failed (exit 7)."""

    exit_code = 7


class Interrupted(FeatxError):
    """The run was stopped by a signal; partial progress was kept where promised."""

    def __init__(self, message: str, signum: int):
        super().__init__(message, exit_code=128 + signum)
        self.signum = signum


class _Terminated(KeyboardInterrupt):
    """SIGTERM seen as a KeyboardInterrupt, so every cleanup path written for Ctrl-C also runs for SIGTERM."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def sigterm_raises():
    """Inside the block SIGTERM raises a KeyboardInterrupt (``signal_of(exc) == SIGTERM``), so the cleanup written
    for Ctrl-C (locks released, temp files removed, folders a run created and left empty removed) runs for SIGTERM
    too. The CLI wraps every command in it; nesting is fine (the outer handler is restored on exit).

    Only the first SIGTERM raises: a second one while that cleanup runs is ignored, so it cannot cut the cleanup
    short and strand a lock (SIGKILL still stops the process at once).
    """
    try:
        old = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    if old is not _raise_terminated:  # the outermost block: a fresh start
        _TERM["seen"] = False
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def signal_of(exc: BaseException) -> int:
    """The signal behind a KeyboardInterrupt: SIGTERM for one raised by `sigterm_raises`, else SIGINT (Ctrl-C)."""
    return int(getattr(exc, "signum", signal.SIGINT))


def signal_name(signum: int) -> str:
    return "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"


@contextlib.contextmanager
def interruptible(hint: str):
    """Inside the block, Ctrl-C and SIGTERM raise ``Interrupted`` whose message ends with ``hint``.

    ``hint`` says what was kept and how to continue ("finished chunks were kept; re-run the same command to
    resume"), so both signals tell the user the same thing; exit codes are 130 (SIGINT) and 143 (SIGTERM).
    """
    try:
        with sigterm_raises():
            yield
    except KeyboardInterrupt as exc:
        signum = signal_of(exc)
        raise Interrupted(f"stopped by {signal_name(signum)}; {hint}", signum) from None


_TERM = {"seen": False}


def _raise_terminated(signum, _frame):
    if _TERM["seen"]:
        return  # already stopping: let the cleanup finish
    _TERM["seen"] = True
    raise _Terminated()


def signals_to_main_thread() -> None:
    """Block SIGINT / SIGTERM in the calling worker thread (a ThreadPoolExecutor ``initializer``).

    Why: the kernel may deliver a process's signal to any thread that does not block it; Python runs the handler
    (Ctrl-C / SIGTERM -> cleanup, exit 130 / 143) only in the main thread, and a main thread blocked in a system call
    is woken (EINTR) only if the signal was delivered to it. Blocking them in featx's decode and lane threads sends
    every such signal to the main thread."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

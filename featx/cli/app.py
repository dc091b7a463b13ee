"""The `featx` Typer app and its one error boundary: FeatxError (and write errors) -> one red line + exit code."""
from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from ..errors import FeatxError
from .common import err, error_line
from .plain_help import PlainHelpGroup

app = typer.Typer(
    cls=PlainHelpGroup,  # no `<bool>` beside --version and --help
    name="featx",
    help="Transfer learning for folders of images: extract pretrained features, fit heads, fine-tune, "
    "train small CNNs from scratch, compare, and predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"traceback": os.environ.get("FEATX_TRACEBACK", "0") not in ("", "0")}


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"featx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    traceback: bool = typer.Option(False, "--traceback", help="Show full Python tracebacks (for bug reports); "
                                   "accepted anywhere on the command line. Same as FEATX_TRACEBACK=1."),
    version: Optional[bool] = typer.Option(None, "--version", help="Print the featx version and exit.",
                                           is_eager=True, callback=_print_version),
):
    _state["traceback"] = traceback or _state["traceback"]


def run_boundary(fn):
    """Decorator for command bodies: translate FeatxError (and OS write errors) into `Error: ...` + exit code, once."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .._io import WRITE_ERRNOS, output_error
        from ..errors import signal_name, signal_of, sigterm_raises
        from .common import library_warnings

        try:
            # SIGTERM, for every command: raised as an interrupt, so locks, temp files and empty folders are cleaned
            # up as for Ctrl-C, then one line and exit 143 (the default action would leave them all behind)
            with library_warnings(), sigterm_raises():
                return fn(*args, **kwargs)
        except (FeatxError, OSError, KeyboardInterrupt, ModuleNotFoundError) as exc:
            if _state["traceback"]:
                raise
            if isinstance(exc, KeyboardInterrupt):
                signum = signal_of(exc)
                err.print(error_line(f"stopped by {signal_name(signum)}; featx writes every output atomically, so "
                                     "none is half-written"))
                raise typer.Exit(code=128 + signum)
            if isinstance(exc, ModuleNotFoundError):
                exc = _missing_dependency(exc)
                if exc is None:
                    raise
            if isinstance(exc, OSError):
                if exc.errno not in WRITE_ERRNOS:
                    raise  # not a user's fault we can explain: a bug, keep the traceback
                exc = output_error(exc.filename or "an output", exc)
            err.print(error_line(str(exc)))
            raise typer.Exit(code=exc.exit_code)

    return wrapper


# featx's dependencies, import name -> pip name. An install without them (a deployment machine that only runs
# `featx predict --model model.onnx`, see the README) gets one line naming the package, not a traceback.
_DEPENDENCIES = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "sklearn": "scikit-learn",
                 "skops": "skops", "safetensors": "safetensors", "matplotlib": "matplotlib"}


def _missing_dependency(exc: ModuleNotFoundError) -> Optional[FeatxError]:
    from ..errors import UsageError

    pip = _DEPENDENCIES.get((exc.name or "").split(".")[0])
    if pip is None:
        return None
    return UsageError(f"{pip} is not installed and this command needs it: pip install {pip} (or install featx with its "
                      "dependencies); without torch, featx runs `featx predict --model MODEL.onnx` only")


# Command modules register themselves on `app` when imported (one module per command).
from . import audit, compare, export, extract, finetune, fit, models, predict, scratch  # noqa: E402,F401


def _lift_traceback_flag(argv: list) -> list:
    """`--traceback` works before or after the subcommand: take it out wherever it is (up to a `--`)."""
    end = argv.index("--") if "--" in argv else len(argv)
    if "--traceback" in argv[:end]:
        _state["traceback"] = True
        argv = [a for i, a in enumerate(argv) if not (i < end and a == "--traceback")]
    return argv


def main(argv: Optional[list] = None) -> None:
    args = _lift_traceback_flag(list(sys.argv[1:] if argv is None else argv))
    app(args=args, prog_name="featx")


if __name__ == "__main__":  # pragma: no cover
    main()

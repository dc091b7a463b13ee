"""The `featx` Typer app and its one error boundary: FeatxError -> red one-line message + exit code."""
from __future__ import annotations

import os
from typing import Optional

import typer

from ..errors import FeatxError
from .common import err

app = typer.Typer(
    name="featx",
    help="Transfer learning for folders of images: extract pretrained features, fit heads, fine-tune, "
    "train small CNNs from scratch, compare, and predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"traceback": bool(os.environ.get("FEATX_TRACEBACK"))}


@app.callback()
def _root(
    traceback: bool = typer.Option(False, "--traceback", help="Show full Python tracebacks (for bug reports)."),
    version: Optional[bool] = typer.Option(None, "--version", help="Print the featx version and exit.", is_eager=True),
):
    if version:
        from .. import __version__

        typer.echo(f"featx {__version__}")
        raise typer.Exit()
    _state["traceback"] = traceback or _state["traceback"]


def run_boundary(fn):
    """Decorator for command bodies: translate FeatxError into `Error: ...` + exit code, once."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .common import library_warnings

        try:
            with library_warnings():
                return fn(*args, **kwargs)
        except FeatxError as exc:
            if _state["traceback"]:
                raise
            msg = str(exc).strip().replace("\n", " ")
            err.print(f"[bold red]Error:[/bold red] {msg}", markup=True, highlight=False)
            raise typer.Exit(code=exc.exit_code)
        except KeyboardInterrupt:
            if _state["traceback"]:
                raise
            err.print("[bold red]Interrupted.[/bold red]", markup=True)
            raise typer.Exit(code=130)

    return wrapper


# Command modules register themselves on `app` when imported (one module per command).
from . import compare, extract, finetune, fit, models, predict, scratch  # noqa: E402,F401


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

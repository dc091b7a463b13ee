"""Typer command and group classes whose --help shows no type placeholders: `IMAGES` not `{images}`, flags without
`<bool>`."""
from __future__ import annotations

from typer.core import TyperArgument, TyperCommand, TyperGroup


class _PlainParams:
    """The shared part: every parameter, and the --help option Click adds late, drawn without type placeholders."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            _plain(param)

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None:
            _plain(opt)
        return opt


class PlainHelpCommand(_PlainParams, TyperCommand):
    """Use as ``@app.command("name", cls=PlainHelpCommand)``.

    Typer 0.29 writes a required argument as ``{images}`` in the usage line and gives every on/off flag a ``<bool>``
    type column; both read like something to type. Arguments are shown by their name in capitals (as the README
    writes them), flags bare.
    """

    def collect_usage_pieces(self, ctx):
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


class PlainHelpGroup(_PlainParams, TyperGroup):
    """The same for the root (``typer.Typer(cls=PlainHelpGroup)``): its flags (--traceback, --version, --help)."""


def _plain(param) -> None:
    if isinstance(param, TyperArgument) and param.metavar is None:
        param.metavar = param.name.upper()
    elif getattr(param, "is_flag", False) and param.metavar is None:
        param.metavar = ""

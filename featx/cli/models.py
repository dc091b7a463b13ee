"""`featx models`: the backbones featx knows, their feature and input sizes, and whether weights are here."""
from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from .app import app, run_boundary
from .common import out, print_json
from .plain_help import PlainHelpCommand


@app.command("models", cls=PlainHelpCommand)
@run_boundary
def models_cmd(
    search: Optional[str] = typer.Argument(None, help="Also list timm/torchvision model names containing this text."),
    json_: bool = typer.Option(False, "--json", help="Print the list as JSON."),
):
    """List backbones: embedded (offline) ones, popular timm/torchvision ones, or search every name."""
    from ..backbones import list_backbones, search_backbones

    rows = list_backbones()
    found = search_backbones(search) if search else []
    if json_:
        print_json({"backbones": rows, "matches": found})
        return
    if search:  # a search answers the search: the default table only with its rows that match (issue 24.9)
        rows = [r for r in rows if search.casefold() in r["name"].casefold()]
    if rows or not search:
        out.print(_table(rows))
    if search:
        out.print(f"{len(found)} names contain {search!r}: " + ", ".join(found[:200]))
    else:
        out.print("Any timm model (e.g. resnet50, timm/convnext_tiny.fb_in1k) or torchvision model (tv/resnet18) "
                  "works by name; `featx models TEXT` searches them.")


def _table(rows: list) -> Table:
    t = Table(title="featx backbones", title_justify="left")
    for col in ("name", "source", "features", "input", "weights here", "weights"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["source"], str(r["feature_dim"]), str(r["input_size"]),
                  "yes" if r["weights_available"] else "no", str(r["weights"]))
    return t

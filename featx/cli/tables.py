"""Rich renderers for metrics dicts (featx.report): headline scores, per-class tables, confusion matrices, comparisons.

Shared by fit, finetune, scratch, predict and compare so every command shows scores the same way. Functions return
Rich renderables; the caller prints them on ``featx.cli.common.out``.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from rich.table import Table
from rich.text import Text


def fmt(x, digits: int = 3) -> str:
    """A score for humans: 3 decimals, '-' for missing or NaN."""
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def fmt_param(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def cv_line(cv: Optional[Mapping]) -> Text:
    """``CV (5-fold accuracy): C=0.1 -> 0.962 ± 0.008, grid 0.001..10 (widened 1)``."""
    if not cv:
        return Text("CV: off (fixed parameter, no cross-validation)", style="dim")
    span = cv.get("grid") or []
    grid = f"{fmt_param(span[0])}..{fmt_param(span[-1])}" if len(span) > 1 else "fixed"
    t = Text(f"CV ({cv.get('folds')}-fold {cv.get('metric', 'accuracy').replace('_', ' ')}): ")
    t.append(f"{cv.get('param')}={fmt_param(cv.get('best'))}", style="bold")
    t.append(f" -> {fmt(cv.get('mean'))} ± {fmt(cv.get('std'))}")
    t.append(f", grid {grid}" if grid != "fixed" else " (value fixed by the user)", style="dim")
    if cv.get("widened"):
        t.append(f", widened {cv['widened']}x", style="dim")
    if cv.get("at_edge"):
        t.append("  best value at the edge of the range", style="yellow")
    return t


def metrics_table(scores: Mapping[str, Mapping], title: Optional[str] = None) -> Table:
    """One row per evaluated split: accuracy, balanced accuracy, majority-class rate, macro-F1, n. A split whose
    accuracy does not clearly beat the majority-class rate (featx.report's chance rule) is marked "chance" in
    yellow and explained under the table."""
    table = Table(title=title, title_justify="left", caption_justify="left")
    table.add_column("split")
    for col in ("accuracy", "balanced acc.", "majority rate", "macro-F1", "n"):
        table.add_column(col, justify="right")
    flagged = []
    for name, m in scores.items():
        chance = m.get("beats_chance") is False
        acc = Text(fmt(m.get("accuracy")) + (" chance" if chance else ""), style="yellow" if chance else "")
        table.add_row(name, acc, fmt(m.get("balanced_accuracy")), fmt(m.get("majority_rate")), fmt(m.get("macro_f1")),
                      fmt(m.get("n")))
        if chance:
            flagged.append(name)
    if flagged:
        table.caption = chance_caption(flagged)
        table.caption_style = "yellow"
    return table


def chance_caption(names: Sequence[str]) -> str:
    """What the "chance" mark means, under a table that has one."""
    return (f"chance: {', '.join(map(str, names))} not clearly above the majority-class rate (always answering the "
            f"commonest class): this model has not shown that it learned anything")


def per_class_table(metrics: Mapping, title: Optional[str] = None) -> Table:
    """Precision, recall, F1 and support per class; recall below 0.5 is highlighted."""
    table = Table(title=title, title_justify="left")
    table.add_column("class")
    for col in ("precision", "recall", "F1", "support"):
        table.add_column(col, justify="right")
    for cls, row in metrics.get("per_class", {}).items():
        style = "red" if row.get("support", 0) and row.get("recall", 1.0) < 0.5 else None
        table.add_row(str(cls), fmt(row.get("precision")), fmt(row.get("recall")), fmt(row.get("f1")),
                      str(row.get("support", "")), style=style)
    return table


def confusion_table(metrics: Mapping, title: Optional[str] = None, max_classes: int = 20) -> Table | Text:
    """Counts, rows = true class, columns = predicted; the diagonal in green, errors in red.

    Above ``max_classes`` the matrix would not fit a terminal: a note points at the PNG instead.
    """
    classes = [str(c) for c in metrics.get("classes", [])]
    cm = metrics.get("confusion", [])
    if len(classes) > max_classes:
        return Text(f"confusion matrix: {len(classes)} classes, too many for the terminal; see the PNG report",
                    style="dim")
    table = Table(title=title, title_justify="left")
    table.add_column("true \\ pred", style="bold")
    for c in classes:
        table.add_column(_short(c), justify="right")
    for i, c in enumerate(classes):
        cells = []
        for j in range(len(classes)):
            v = int(cm[i][j]) if i < len(cm) and j < len(cm[i]) else 0
            style = "green" if i == j and v else ("red" if v else "dim")
            cells.append(Text(str(v), style=style))
        table.add_row(_short(c), *cells)
    return table


def comparison_table(rows: Sequence[Mapping], columns: Sequence[tuple], title: Optional[str] = None,
                     highlight_first: bool = True) -> Table:
    """Generic comparison: ``columns`` are ``(header, key)``; values are looked up with dotted keys
    (``"scores.val.accuracy"``). The first row (the best, when rows are sorted) is bold."""
    table = Table(title=title, title_justify="left")
    for i, (header, _) in enumerate(columns):
        table.add_column(header, justify="left" if i == 0 else "right")
    for r, row in enumerate(rows):
        vals = [fmt(_dig(row, key)) for _, key in columns]
        table.add_row(*vals, style="bold" if highlight_first and r == 0 else None)
    return table


def _dig(d, dotted: str):
    cur = d
    for part in dotted.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        else:
            return None
    if isinstance(cur, Mapping):  # e.g. params: {"C": 0.1} -> "C=0.1"
        return ", ".join(f"{k}={fmt_param(v)}" for k, v in cur.items())
    return cur


def _short(name: str, width: int = 14) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"

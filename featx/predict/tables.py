"""Prediction tables: one registry of formats (CSV, JSON lines). A new format is one function registered here.

A row is a dict with the keys, in this order: ``path``, ``label``, ``confidence`` (written as ``probability`` or
``decision_score``, for what it holds), ``top_k`` ([{"label", "score"}], best first), ``true_label`` (labelled
folders only), ``sorted_to`` and ``sort_status`` (with ``--sort-into`` only), ``error``. A format function turns rows
into bytes; `write_table` writes them atomically. Each format also says how to recognise a file it wrote, so
`featx predict` may replace its own tables but never a user's file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

from .._io import atomic_write, csv_bytes, safe_str
from ..errors import UsageError

ROW_KEYS = ("path", "label", "confidence", "top_k", "true_label", "sorted_to", "sort_status", "error")


# The column holding the predicted class's score is named for what it holds (`featx predict` writes the first two;
# "confidence" is the row key in the library and the column for callers that do not say).
SCORE_COLUMNS = ("probability", "decision_score", "confidence")


def score_column(kind: str) -> str:
    """A model's score kind ("probability", "decision" or "decision score") -> the table's score column."""
    return "probability" if kind == "probability" else "decision_score"


@dataclass(frozen=True)
class Layout:
    """Which optional columns a table has: ``top_k`` score pairs, ``true_label``, the two sort columns; and the
    name of the score column (``score``: one of SCORE_COLUMNS)."""

    top_k: int = 3
    labelled: bool = False
    sorted: bool = False
    score: str = "confidence"


@dataclass(frozen=True)
class TableFormat:
    name: str
    suffixes: tuple  # output suffixes that choose this format when --format is not given
    render: Callable[[Sequence[dict], Layout], bytes]
    recognise: Callable[[Path], bool]  # True for a non-empty file this format wrote


FORMATS: Dict[str, TableFormat] = {}
DEFAULT_FORMAT = "csv"


def table_format(name: str, suffixes: Sequence[str], recognise: Callable[[Path], bool]):
    """Register ``render(rows, layout) -> bytes`` as the format ``name``."""
    def register(render):
        FORMATS[name] = TableFormat(name, tuple(suffixes), render, recognise)
        return render
    return register


def resolve_format(path: Optional[Path], fmt: Optional[str]) -> str:
    """``--format`` if given (validated), else from the output suffix, else CSV."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        return fmt
    suffix = path.suffix.lower() if path is not None else ""
    return next((f.name for f in FORMATS.values() if suffix in f.suffixes), DEFAULT_FORMAT)


def write_table(rows: Sequence[dict], path, fmt: str = DEFAULT_FORMAT, layout: Layout = Layout()) -> Path:
    """Write ``rows`` atomically in format ``fmt`` (UTF-8 whatever the locale)."""
    if fmt not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    data = FORMATS[fmt].render(rows, layout)
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return path


def is_featx_table(path: Path) -> bool:
    """A file some registered format recognises as its own (what check_outputs may replace without --overwrite)."""
    return any(f.recognise(path) for f in FORMATS.values())


def write_rows(rows: Sequence[dict], path, fmt: str = DEFAULT_FORMAT, *, labelled: bool = False, top_k: int = 3,
               sorted: bool = False) -> Path:
    """`write_table` with the layout spelled out (the signature predict has always had)."""
    return write_table(rows, path, fmt, Layout(top_k=top_k, labelled=labelled, sorted=sorted))


def _first_line(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.readline(1 << 16).decode("utf-8", "replace").lstrip("\ufeff").strip()
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------ CSV
_CSV_STARTS = tuple(f"path,label,{c}" for c in SCORE_COLUMNS)  # how we recognise a CSV we wrote


def csv_header(top_k: int, labelled: bool, sorted: bool = False, score: str = "confidence") -> list:
    cols = ["path", "label", score]
    for j in range(1, top_k + 1):
        cols += [f"top{j}", f"top{j}_score"]
    if labelled:
        cols.append("true_label")
    if sorted:
        cols += ["sorted_to", "sort_status"]
    return cols + ["error"]


def _fmt_score(x) -> str:
    return "" if x is None else f"{x:.6g}"


@table_format("csv", suffixes=(".csv",), recognise=lambda p: _first_line(p).startswith(_CSV_STARTS))
def _render_csv(rows: Sequence[dict], layout: Layout) -> bytes:
    def line(r):
        cells = [r["path"], r["label"] or "", _fmt_score(r["confidence"])]
        for j in range(layout.top_k):
            t = r["top_k"][j] if j < len(r["top_k"]) else None
            cells += [t["label"], _fmt_score(t["score"])] if t else ["", ""]
        if layout.labelled:
            cells.append(r.get("true_label") or "")
        if layout.sorted:
            cells += [r.get("sorted_to") or "", r.get("sort_status") or ""]
        return cells + [r["error"] or ""]

    # featx's one CSV dialect (_io.csv_bytes): any file name round-trips through csv and pandas, one row per image
    return csv_bytes(csv_header(layout.top_k, layout.labelled, layout.sorted, layout.score), (line(r) for r in rows))


# ------------------------------------------------------------------------------------------------ JSON lines
def _jsonl_is_ours(path: Path) -> bool:
    try:
        obj = json.loads(_first_line(path))
    except ValueError:
        return False
    return isinstance(obj, dict) and {"path", "label"} <= set(obj) and any(c in obj for c in SCORE_COLUMNS)


# Characters json.dumps(ensure_ascii=False) leaves raw that str.splitlines (and JavaScript) treat as line ends: escaped,
# so a name holding one stays on its row for any line-based reader (json.loads reads the escape back exactly).
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


@table_format("jsonl", suffixes=(".jsonl", ".json", ".ndjson"), recognise=_jsonl_is_ours)
def _render_jsonl(rows: Sequence[dict], layout: Layout) -> bytes:
    # safe_str: a name that is not valid UTF-8 must not make the whole table fail to encode
    return "".join(safe_str(json.dumps(_score_named(r, layout.score), ensure_ascii=False)).translate(_LINE_BREAKS)
                   + "\n" for r in rows).encode("utf-8")


def _score_named(row: dict, score: str) -> dict:
    """The row with its ``confidence`` key named ``score``, in the same place."""
    if score == "confidence" or "confidence" not in row:
        return row
    return {(score if k == "confidence" else k): v for k, v in row.items()}

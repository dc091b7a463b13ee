"""The audit's report folder: report.md, one CSV per finding kind (paths relative to the image root) and one PNG
gallery per kind. Every file is checked and locked before any work and written atomically."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Optional

from .._io import OutputLock, atomic_write, check_outputs, safe_str, stamp, write_csv, write_markdown

CSV_COLUMNS = {
    "duplicates.csv": ["group", "size", "leakage", "conflicting_labels", "path", "split", "role", "label",
                       "similarity", "exact"],
    "label_issues.csv": ["rank", "path", "split", "role", "given", "suggested", "given_probability",
                         "suggested_probability"],
    "outliers.csv": ["rank", "path", "split", "role", "label", "score"],
}
GALLERIES = ("duplicates.png", "label_issues.png", "outliers.png")
SCORES_CSV = "scores.csv"  # every image, every score (featx.audit.scores.COLUMNS)
SCORES_PARQUET = "scores.parquet"  # the same table, with the parquet extra (pyarrow)
HTML = "report.html"
GALLERY_ROWS = 12  # duplicate groups (one per row) or images (in rows of 6) shown per gallery; the CSVs list all


def _csv_recogniser(name: str):
    from .scores import COLUMNS

    header = ",".join(COLUMNS if name == SCORES_CSV else CSV_COLUMNS[name])

    def ours(path: Path) -> bool:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                return fh.readline().rstrip("\r\n") == header
        except OSError:
            return False

    return ours


def report_files(folder: Path) -> dict:
    """Every file the report writes -> its recogniser (None: featx's own Markdown / PNG stamp)."""
    folder = Path(folder)
    files = {folder / "report.md": None}
    files.update({folder / name: _csv_recogniser(name) for name in CSV_COLUMNS})
    files.update({folder / name: None for name in GALLERIES})
    files[folder / SCORES_CSV] = _csv_recogniser(SCORES_CSV)
    if _has_pyarrow():
        files[folder / SCORES_PARQUET] = _parquet_is_ours
    from ..report_html import html_is_ours

    files[folder / HTML] = html_is_ours
    return files


PARQUET_KEY = b"featx"  # schema metadata key, as featx.export.parquet marks its files


def _parquet_is_ours(path: Path) -> bool:
    try:
        import pyarrow.parquet as pq

        return PARQUET_KEY in (pq.read_schema(path).metadata or {})
    except Exception:  # not Parquet, unreadable: not provably ours
        return False


def _has_pyarrow() -> bool:
    import importlib.util

    return importlib.util.find_spec("pyarrow") is not None


@contextlib.contextmanager
def claim(outputs: dict, *, overwrite: bool = False):
    """check_outputs + the OutputLock of report.md for the run (nothing when no report is written)."""
    if not outputs:
        yield None
        return
    check_outputs(outputs, overwrite=overwrite)
    with OutputLock(next(iter(outputs))) as held:
        yield held


def write_report(res, folder: Path) -> list:
    """Write every report file (all of them, even empty, so a folder never mixes two runs); returns the paths."""
    folder = Path(folder)
    root = Path(res.root) if res.root else None
    written = []
    for name, rows in (("duplicates.csv", _duplicate_rows(res.duplicates)), ("label_issues.csv", res.label_issues),
                       ("outliers.csv", res.outliers)):
        written.append(_write_csv(folder / name, CSV_COLUMNS[name], rows))
    written.append(_duplicates_png(res.duplicates, folder / "duplicates.png", root))
    written.append(_items_png(res.label_issues, folder / "label_issues.png", root,
                              "likely label errors: given -> suggested (p)",
                              lambda r: (f"{r['rank']}. {r['given']}->{r['suggested']} {r['suggested_probability']:.2f}",
                                         Path(r["path"]).name)))
    written.append(_items_png(res.outliers, folder / "outliers.png", root,
                              f"outliers: label (distance to the {ordinal(res.info['settings']['k'])} nearest image)",
                              lambda r: (f"{r['rank']}. {r['label'] or ''} {r['score']:.2f}", Path(r["path"]).name)))
    if res.scores is not None:
        written.append(write_csv(folder / SCORES_CSV, _score_columns(), res.scores.rows()))
        if _has_pyarrow():
            written.append(_write_parquet(res.scores, folder / SCORES_PARQUET))
    written.append(write_markdown(folder / "report.md", markdown(res, top=res.top)))
    from .html import write_page

    written.append(write_page(res, folder / HTML))
    return written


def _score_columns() -> list:
    from .scores import COLUMNS

    return COLUMNS


def _write_parquet(table, path: Path) -> Path:
    """scores.parquet: the scores table with featx's schema metadata (how featx recognises a file it wrote)."""
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .scores import COLUMNS

    cols = {}
    for c in COLUMNS:
        v = table.columns[c]
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            cols[c] = pa.array(v, type=pa.float64(), from_pandas=True)  # NaN -> null: an empty cell, as in the CSV
        elif c in ("label_flagged", "outlier_flagged", "crosses_splits"):
            cols[c] = pa.array(v, type=pa.bool_())
        elif c == "duplicate_group":
            cols[c] = pa.array(v, type=pa.int64())
        else:
            cols[c] = pa.array([None if x is None else safe_str(str(x)) for x in v], type=pa.string())
    meta = {PARQUET_KEY: json.dumps({"format": "featx-audit-scores", "written_by": stamp()}).encode()}
    data = pa.table(cols).replace_schema_metadata(meta)
    with atomic_write(path, "wb") as fh:
        pq.write_table(data, fh)
    return path


def _duplicate_rows(groups: list) -> list:
    return [{**{k: g[k] for k in ("group", "size", "leakage", "conflicting_labels")}, **m}
            for g in groups for m in g["members"]]


def _write_csv(path: Path, columns: list, rows: list) -> Path:
    return write_csv(path, columns, ([r.get(k) for k in columns] for r in rows))


def ordinal(k: int) -> str:
    return f"{k}{'th' if 11 <= k % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


# --------------------------------------------------------------------------------------------------- galleries
# Drawn with Pillow, not matplotlib: three matplotlib galleries took 3.5-8 s per audit on the 2 shared cores here
# (1.2-1.7 s each, measured with cProfile), far more than the audit of a few thousand images itself; pasting
# thumbnails on one canvas takes milliseconds.
TILE = 128
CAPTION = 30  # pixels of caption under each tile (two short lines)
GREY, RED, BLACK = (160, 160, 160), (200, 30, 30), (0, 0, 0)


def _thumb(root: Optional[Path], rel: str):
    if root is None:
        return None
    try:
        from ..data.decode import load_rgb

        img = load_rgb(root / rel).copy()
        img.thumbnail((TILE, TILE))
        return img
    except Exception:  # a gallery must render even when a file moved or is unreadable
        return None


def _gallery(rows: list, title: str, path: Path, empty: str) -> Path:
    """rows: lists of (image or None, caption line 1, caption line 2, colour); one canvas, atomically written."""
    from PIL import Image, ImageDraw, ImageFont
    from PIL.PngImagePlugin import PngInfo

    try:
        font = ImageFont.load_default(size=10)  # Pillow >= 10.1 with FreeType: a small scalable font
    except TypeError:  # pragma: no cover - older Pillow: the fixed bitmap font
        font = ImageFont.load_default()
    cols = max([1] + [len(r) for r in rows])
    width, head = cols * (TILE + 8) + 8, 24
    canvas = Image.new("RGB", (max(width, 320), head + max(1, len(rows)) * (TILE + CAPTION + 8)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill=BLACK, font=font)
    if not rows:
        draw.text((8, head + 8), empty, fill=BLACK, font=font)
    for r, row in enumerate(rows):
        y = head + r * (TILE + CAPTION + 8)
        for c, (img, line1, line2, colour) in enumerate(row):
            x = 8 + c * (TILE + 8)
            if img is None:
                draw.rectangle((x, y, x + TILE - 1, y + TILE - 1), fill=GREY)
                draw.text((x + 8, y + TILE // 2 - 6), "not found", fill=BLACK, font=font)
            else:
                canvas.paste(img, (x + (TILE - img.width) // 2, y + (TILE - img.height) // 2))
            draw.text((x, y + TILE + 2), _fit(line1), fill=colour, font=font)
            draw.text((x, y + TILE + 15), _fit(line2), fill=colour, font=font)
    info = PngInfo()
    info.add_text("Software", stamp())  # how featx recognises a PNG it wrote (and may replace)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", pnginfo=info)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
    return path


def _fit(text: str, chars: int = 23) -> str:
    text = safe_str(str(text))
    return text if len(text) <= chars else text[:chars - 1] + "~"


def _duplicates_png(groups: list, path: Path, root: Optional[Path], columns: int = 6) -> Path:
    """One row per group (leakage first, captions in red), its members side by side."""
    rows = []
    for g in groups[:GALLERY_ROWS]:
        colour = RED if g["leakage"] else BLACK
        rows.append([(_thumb(root, m["path"]),
                      f"#{g['group']} {m['role'] or m['split'] or ''} {m['label'] or ''}",
                      f"{'exact' if m['exact'] else format(m['similarity'], '.3f')} {Path(m['path']).name}", colour)
                     for m in g["members"][:columns]])
    shown = f"{len(rows)} of {len(groups)}" if len(rows) < len(groups) else f"{len(groups)}"  # count what is drawn
    return _gallery(rows, f"near-duplicate groups: {shown} (across splits = leakage, in red)", path,
                    "no near-duplicates")


def _items_png(items: list, path: Path, root: Optional[Path], title: str, caption, columns: int = 6) -> Path:
    tiles = [(_thumb(root, r["path"]), *caption(r), BLACK) for r in items[:GALLERY_ROWS]]
    rows = [tiles[i:i + columns] for i in range(0, len(tiles), columns)]
    return _gallery(rows, title, path, "nothing found")


# --------------------------------------------------------------------------------------------------- report.md
def _md(s) -> str:
    """A table cell: pipes and newlines would break the Markdown table."""
    return safe_str("" if s is None else str(s)).replace("|", "\\|").replace("\n", " ")


def markdown(res, top: int = 20) -> str:
    info = res.info
    st = info["settings"]
    ran = info["checks"]
    lines = [f"# featx audit of {_md(res.features_path or 'features in memory')}", "",
             f"{res.n_images} images; paths are relative to the image root `{_md(res.root)}`. Read-only: nothing "
             "was moved or deleted.", ""]
    lines.append(f"- near-duplicate groups: **{len(res.duplicates)}** ({len(res.leakage)} span splits = leakage), "
                 f"cosine >= {st['threshold']}" if "duplicates" in ran else "- near-duplicates: not run")
    lines.append(f"- likely label errors: **{len(res.label_issues)}**" + _label_line(info) if "labels" in ran
                 else "- likely label errors: not run" + (" (the store has no labels)" if "labels" in info["skipped"] else ""))
    lines.append(f"- outliers: **{len(res.outliers)}** (cosine distance to the {ordinal(st['k'])} nearest image above "
                 f"{info.get('outlier_cut', '-')}: Q3 + {st['fence']} IQR)" if "outliers" in ran else "- outliers: not run")
    lines.append(f"- splits as `featx fit` uses them: {_md(info.get('split_rule'))}")
    if info.get("search"):
        s = info["search"]
        lines.append(f"- neighbour search: {s['backend']}, {'PCA projection to ' if s['projected'] else ''}"
                     f"{s['searched_dim']} dimensions{', candidates re-checked exactly' if s['projected'] else ''}")
    lines += [f"- note: {_md(n)}" for n in info.get("notes", [])]
    if "duplicates" in ran:
        lines += ["", "## Near-duplicates (leakage first)", "", "duplicates.csv, duplicates.png", "",
                  "| group | leakage | path | split | label | similarity | exact |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {g['group']} | {'yes' if g['leakage'] else ''} | {_md(m['path'])} | {_md(m['role'] or m['split'])} "
                  f"| {_md(m['label'])} | {m['similarity']:.3f} | {'yes' if m['exact'] else ''} |"
                  for g in res.duplicates[:top] for m in g["members"]]
    if "labels" in ran:
        lab = info.get("labels") or {}
        lines += ["", "## Likely label errors", ""]
        if lab.get("chance_level"):  # the same words as the terminal's warning, where the list is read
            lines += [f"**Warning: meaningless at chance level.** The cross-validated accuracy "
                      f"{lab['cv_accuracy']} is not clearly above the majority-class rate {lab['majority_rate']}: the "
                      "features do not predict the labels, so this list is noise, not label errors.", ""]
        lines += ["label_issues.csv, label_issues.png", "",
                  "| rank | path | given | suggested | p(given) | p(suggested) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['rank']} | {_md(r['path'])} | {_md(r['given'])} | {_md(r['suggested'])} | "
                  f"{r['given_probability']:.3f} | {r['suggested_probability']:.3f} |" for r in res.label_issues[:top]]
    if "outliers" in ran:
        lines += ["", "## Outliers", "", "outliers.csv, outliers.png", "", "| rank | path | label | score |",
                  "|---|---|---|---|"]
        lines += [f"| {r['rank']} | {_md(r['path'])} | {_md(r['label'])} | {r['score']:.3f} |"
                  for r in res.outliers[:top]]
    lines += _rankings_md(res, top)
    lines += ["", f"Only the first {top} of each list are shown here; the CSVs list all, scores.csv every image. "
              "report.html shows the same lists with thumbnails, sortable.", ""]
    return "\n".join(lines)


RANKING_TITLES = {
    "label": ("Label-issue score, top {n}", "label_score", "given", "suggested", "label_flagged"),
    "outlier": ("Outlier score, top {n}", "outlier_score", "label", "outlier_percentile", "outlier_flagged"),
    "duplicate": ("Nearest other image, top {n} by similarity", "nearest_similarity", "nearest", "duplicate_group",
                  "crosses_splits"),
}


def ranking_explained(name: str) -> str:
    from .scores import CLASS_WEIGHT, NEIGHBOUR_WEIGHT

    return {
        "label": f"{1 - NEIGHBOUR_WEIGHT:g} x (1 - p(given)) from the cross-validated head + {NEIGHBOUR_WEIGHT:g} x "
                 "the share of its nearest images that carry another label (similarity-weighted); 0..1, higher = "
                 "more likely mislabelled",
        "outlier": f"{1 - CLASS_WEIGHT:g} x the percentile of the distance to the k-th nearest image of the whole set "
                   f"+ {CLASS_WEIGHT:g} x that within the image's own class; 0..1, higher = more isolated",
        "duplicate": "cosine similarity to the nearest other image (duplicates are at or above the threshold)",
    }[name]


def _rankings_md(res, top: int) -> list:
    """Top rows of every score, flagged or not (issue 25): how far down the flagged sets a user may want to look."""
    if res.scores is None or not top:
        return []
    lines = []
    for name, rows in res.rankings(top).items():
        title, score, a, b, flag = RANKING_TITLES[name]
        lines += ["", f"## {title.format(n=len(rows))} (flagged or not)", "", _md(ranking_explained(name)), "",
                  f"| rank | path | split | {score} | {a} | {b} | flagged |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            flagged = r[flag] not in (None, False)
            lines.append(f"| {r[RANKING_RANK[name]]} | {_md(r['path'])} | {_md(r['role'] or r['split'])} | "
                         f"{_fmt(r[score])} | {_md(_fmt(r[a]))} | {_md(_fmt(r[b]))} | {'**yes**' if flagged else ''} |")
    return lines


RANKING_RANK = {"label": "label_rank", "outlier": "outlier_rank", "duplicate": "duplicate_rank"}


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _label_line(info: dict) -> str:
    lab = info.get("labels")
    if not lab:
        return " (not run)"
    st = info["settings"]
    return (f" (cleanlab on out-of-sample probabilities: logistic head, C={st['C']}, {lab['folds']}-fold CV over "
            f"{lab['n_checked']} labelled images; CV accuracy {lab['cv_accuracy']}"
            + (f", majority-class rate {lab['majority_rate']}" if lab.get("majority_rate") is not None else "") + ")")

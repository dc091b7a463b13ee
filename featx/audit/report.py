"""The audit's report folder: report.md, one CSV per finding kind (paths relative to the image root) and one PNG
gallery per kind. Every file is checked and locked before any work and written atomically."""
from __future__ import annotations

import contextlib
import csv
import io
import math
from pathlib import Path
from typing import Optional

import numpy as np

from .._io import OutputLock, atomic_write, check_outputs, safe_str, stamp, write_markdown

CSV_COLUMNS = {
    "duplicates.csv": ["group", "size", "leakage", "conflicting_labels", "path", "split", "role", "label",
                       "similarity", "exact"],
    "label_issues.csv": ["rank", "path", "split", "role", "given", "suggested", "given_probability",
                         "suggested_probability"],
    "outliers.csv": ["rank", "path", "split", "role", "label", "score"],
}
GALLERIES = ("duplicates.png", "label_issues.png", "outliers.png")
GALLERY_ROWS = 12  # duplicate groups (one per row) or images (in rows of 6) shown per gallery; the CSVs list all


def _csv_recogniser(name: str):
    header = ",".join(CSV_COLUMNS[name])

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
    return files


@contextlib.contextmanager
def claim(outputs: dict, *, overwrite: bool = False):
    """check_outputs + the OutputLock of report.md for the run (nothing when no report is written)."""
    if not outputs:
        yield None
        return
    check_outputs(outputs, overwrite=overwrite)
    with OutputLock(next(iter(outputs))) as held:
        yield held


def write_report(res, folder: Path, *, fs=None) -> list:
    """Write every report file (all of them, even empty, so a folder never mixes two runs); returns the paths."""
    folder = Path(folder)
    root = Path(res.root) if res.root else None
    written = []
    for name, rows in (("duplicates.csv", _duplicate_rows(res.duplicates)), ("label_issues.csv", res.label_issues),
                       ("outliers.csv", res.outliers)):
        written.append(_write_csv(folder / name, CSV_COLUMNS[name], rows))
    written.append(_duplicates_png(res.duplicates, folder / "duplicates.png", root))
    written.append(_items_png(res.label_issues, folder / "label_issues.png", root, "likely label errors: given -> suggested",
                              lambda r: (r["given"], r["suggested"], r["suggested_probability"])))
    written.append(_items_png(res.outliers, folder / "outliers.png", root,
                              f"outliers: label (distance to the {ordinal(res.info['settings']['k'])} nearest image)",
                              lambda r: (None, r["label"] or "", r["score"])))
    written.append(write_markdown(folder / "report.md", markdown(res)))
    return written


def _duplicate_rows(groups: list) -> list:
    return [{**{k: g[k] for k in ("group", "size", "leakage", "conflicting_labels")}, **m}
            for g in groups for m in g["members"]]


def _write_csv(path: Path, columns: list, rows: list) -> Path:
    with atomic_write(path, "w") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else safe_str(str(r[k]))) for k in columns})
    return path


def ordinal(k: int) -> str:
    return f"{k}{'th' if 11 <= k % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


# --------------------------------------------------------------------------------------------------- galleries
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path) -> Path:
    plt = _plt()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight", metadata={"Software": stamp()})
    finally:
        plt.close(fig)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
    return path


def _thumb(root: Optional[Path], rel: str, size: int = 128):
    if root is None:
        return None
    try:
        from ..data.decode import load_rgb

        img = load_rgb(root / rel).copy()
        img.thumbnail((size, size))
        return np.asarray(img)
    except Exception:  # a gallery must render even when a file moved or is unreadable
        return None


def _tile(ax, img, title: str, color: str = "black") -> None:
    ax.axis("off")
    if img is None:
        ax.imshow(np.full((128, 128, 3), 160, dtype=np.uint8))
        ax.text(64, 64, "not found", ha="center", va="center", fontsize=8)
    else:
        ax.imshow(img)
    ax.set_title(title, fontsize=7, color=color)


def _duplicates_png(groups: list, path: Path, root: Optional[Path], columns: int = 6) -> Path:
    """One row per group (leakage first, in red), its members side by side."""
    plt = _plt()
    shown = groups[:GALLERY_ROWS]
    cols = max([1] + [min(columns, g["size"]) for g in shown])
    fig, axes = plt.subplots(max(1, len(shown)), cols, figsize=(2.2 * cols, 2.5 * max(1, len(shown)) + 0.4),
                             dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if not shown:
        axes[0, 0].text(0.5, 0.5, "no near-duplicates", ha="center", va="center")
    for row, g in zip(axes, shown):
        for ax, m in zip(row, g["members"][:columns]):
            tag = "exact" if m["exact"] else f"{m['similarity']:.3f}"
            title = f"#{g['group']} {m['role'] or m['split'] or ''} {m['label'] or ''} ({tag})\n{Path(m['path']).name[:28]}"
            _tile(ax, _thumb(root, m["path"]), title, "tab:red" if g["leakage"] else "black")
    fig.suptitle(f"near-duplicate groups ({len(groups)}; leakage across splits in red)")
    fig.tight_layout()
    return _save_png(fig, path)


def _items_png(rows: list, path: Path, root: Optional[Path], title: str, caption, columns: int = 6) -> Path:
    plt = _plt()
    shown = rows[:GALLERY_ROWS]
    cols = max(1, min(columns, len(shown)))
    nrows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(2.2 * cols, 2.5 * nrows + 0.4), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if not shown:
        axes[0, 0].text(0.5, 0.5, "nothing found", ha="center", va="center")
    for ax, r in zip(axes.ravel(), shown):
        given, shown_label, value = caption(r)
        text = f"{given} -> {shown_label}" if given is not None else str(shown_label)
        _tile(ax, _thumb(root, r["path"]), f"{r['rank']}. {text} ({value:.2f})\n{Path(r['path']).name[:28]}")
    fig.suptitle(title)
    fig.tight_layout()
    return _save_png(fig, path)


# --------------------------------------------------------------------------------------------------- report.md
def _md(s) -> str:
    """A table cell: pipes and newlines would break the Markdown table."""
    return safe_str("" if s is None else str(s)).replace("|", "\\|").replace("\n", " ")


def markdown(res, top: int = 20) -> str:
    info = res.info
    st = info["settings"]
    lines = [f"# featx audit of {_md(res.features_path or 'features in memory')}", "",
             f"{res.n_images} images; paths are relative to the image root `{_md(res.root)}`. Read-only: nothing "
             "was moved or deleted.", "",
             f"- near-duplicate groups: **{len(res.duplicates)}** ({len(res.leakage)} span splits = leakage), "
             f"cosine >= {st['threshold']}",
             f"- likely label errors: **{len(res.label_issues)}**" + _label_line(info),
             f"- outliers: **{len(res.outliers)}** (cosine distance to the {ordinal(st['k'])} nearest image above "
             f"{info.get('outlier_cut', '-')}: Q3 + {st['fence']} IQR)",
             f"- splits as `featx fit` uses them: {_md(info.get('split_rule'))}"]
    if info.get("skipped"):
        lines.append(f"- checks not run: {', '.join(info['skipped'])}")
    lines += [f"- note: {_md(n)}" for n in info.get("notes", [])]
    lines += ["", "## Near-duplicates (leakage first)", "", "duplicates.csv, duplicates.png", "",
              "| group | leakage | path | split | label | similarity | exact |", "|---|---|---|---|---|---|---|"]
    for g in res.duplicates[:top]:
        for m in g["members"]:
            lines.append(f"| {g['group']} | {'yes' if g['leakage'] else ''} | {_md(m['path'])} | "
                         f"{_md(m['role'] or m['split'])} | {_md(m['label'])} | {m['similarity']:.3f} | "
                         f"{'yes' if m['exact'] else ''} |")
    lines += ["", "## Likely label errors", "", "label_issues.csv, label_issues.png", "",
              "| rank | path | given | suggested | p(given) | p(suggested) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['rank']} | {_md(r['path'])} | {_md(r['given'])} | {_md(r['suggested'])} | "
              f"{r['given_probability']:.3f} | {r['suggested_probability']:.3f} |" for r in res.label_issues[:top]]
    lines += ["", "## Outliers", "", "outliers.csv, outliers.png", "", "| rank | path | label | score |",
              "|---|---|---|---|"]
    lines += [f"| {r['rank']} | {_md(r['path'])} | {_md(r['label'])} | {r['score']:.3f} |" for r in res.outliers[:top]]
    lines += ["", f"Only the first {top} of each list are shown here; the CSVs list all.", ""]
    return "\n".join(lines)


def _label_line(info: dict) -> str:
    lab = info.get("labels")
    if not lab:
        return " (not run)"
    st = info["settings"]
    return (f" (cleanlab on out-of-sample probabilities: logistic head, C={st['C']}, {lab['folds']}-fold CV over "
            f"{lab['n_checked']} labelled images; CV accuracy {lab['cv_accuracy']})")

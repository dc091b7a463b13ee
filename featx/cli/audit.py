"""`featx audit [FEATURES]`: near-duplicates and split leakage, likely label errors and outliers, from extracted features."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .app import app, run_boundary
from .._io import safe_str
from .common import out, print_json, progress_bar, styled, warn
from .plain_help import PlainHelpCommand

# Literal defaults (not imported) so that `featx --help` does not import numpy/sklearn; tests check they agree.
DEFAULT_FEATURES = Path("featx-out") / "features.npz"


@app.command("audit", cls=PlainHelpCommand)
@run_boundary
def audit_cmd(
    features: Path = typer.Argument(DEFAULT_FEATURES, help="Features file from `featx extract` (labelled or not)."),
    checks: str = typer.Option("duplicates,labels,outliers", "--checks",
                               help="Comma-separated: duplicates, labels, outliers (labels needs a labelled store)."),
    threshold: float = typer.Option(0.88, "--threshold", help="Cosine similarity at which two images are near-duplicates."),
    # --neighbours, not --k: fit's --k is the k-NN head's k, another thing; the old name stays as a hidden alias
    k: int = typer.Option(10, "--neighbours", "--neighbors", min=1,
                          help="Outlier score: distance to the N-th nearest image."),
    k_old: Optional[int] = typer.Option(None, "--k", hidden=True, min=1, help="Old name of --neighbours."),
    fence: float = typer.Option(3.0, "--fence", help="Outliers: score above Q3 + FENCE x IQR (lower lists more)."),
    C: float = typer.Option(0.1, "--C", help="Regularisation of the cross-validated logistic head (label check)."),
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds for out-of-sample probabilities."),
    val_split: float = typer.Option(0.2, "--val-split", help="As `featx fit`: hold-out fraction when there is no val split."),
    seed: int = typer.Option(0, "--seed", help="Seed of the hold-out (same rule as fit), CV folds and PCA."),
    backend: str = typer.Option("auto", "--backend", help="Neighbour search: auto | sklearn | faiss (if installed)."),
    index: str = typer.Option("auto", "--index",
                              help="auto | exact | faiss: faiss = approximate k-NN graph (pip install 'featx[faiss]'); "
                                   "auto = exact up to 100,000 images, faiss beyond when installed."),
    report_dir: Optional[Path] = typer.Option(None, "--report-dir",
                                              help="Report folder (default: beside the store, <name>-audit/)."),
    no_report: bool = typer.Option(False, "--no-report", help="Print only; write no report folder."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root, if the images moved since extraction."),
    top: int = typer.Option(20, "--top", min=0,
                            help="Rows of each list and of each score's ranking (flagged or not) on the terminal, in "
                                 "report.md, report.html and --json; scores.csv lists every image."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Parallel CV fits (-1 = all cores)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow replacing report files featx did not write."),
    json_: bool = typer.Option(False, "--json", help="Print every finding as JSON on stdout."),
):
    """List near-duplicates (cross-split leakage first), likely label errors and outliers. Never moves or deletes images."""
    from ..audit import audit

    k = k if k_old is None else k_old
    with progress_bar("searching neighbours", unit="img") as update:
        res = audit(features, report_dir=False if no_report else (report_dir or True), images=images,
                    overwrite=overwrite, checks=[c.strip() for c in checks.split(",") if c.strip()],
                    threshold=threshold, k=k, fence=fence, C=C, folds=folds, val_split=val_split, seed=seed,
                    backend=backend, index=index, n_jobs=jobs, progress=update, top=top)
    for note in res.info.get("notes", []):
        warn(note)
    if json_:
        print_json(res.to_dict())
        return
    _print(res, top)


def _print(res, top: int) -> None:
    from ..audit.report import ordinal

    info = res.info
    ran = info["checks"]
    line = styled("[bold]{}[/bold] images", res.n_images)
    if "duplicates" in ran:
        line += styled("; near-duplicate groups: [bold]{}[/bold] ([bold red]{}[/bold red] across splits)",
                       len(res.duplicates), len(res.leakage))
    if "labels" in ran:
        line += styled("; likely label errors: [bold]{}[/bold]", len(res.label_issues))
    if "outliers" in ran:
        line += styled("; outliers: [bold]{}[/bold]", len(res.outliers))
    out.print(line)
    out.print(f"splits as `featx fit` uses them: {info.get('split_rule')}")
    if info.get("skipped"):
        out.print(f"not run: {', '.join(info['skipped'])} (no labels in this store)")
    if res.duplicates and top:
        t = _table("Near-duplicates (leakage first)", "group", "leakage", "path", "split", "label", "similarity")
        for g in res.duplicates[:top]:
            for m in g["members"]:
                sim = "exact copy" if m["exact"] else f"{m['similarity']:.3f}"
                t.add_row(str(g["group"]), "yes" if g["leakage"] else "", safe_str(m["path"]), m["role"] or m["split"] or "",
                          m["label"] or "", sim)
        out.print(t)
    if res.label_issues and top:
        t = _table("Likely label errors", "rank", "path", "given", "suggested", "p(given)", "p(suggested)")
        for r in res.label_issues[:top]:
            t.add_row(str(r["rank"]), safe_str(r["path"]), r["given"], r["suggested"], f"{r['given_probability']:.3f}",
                      f"{r['suggested_probability']:.3f}")
        out.print(t)
    if res.outliers and top:
        t = _table(f"Outliers (distance to the {ordinal(info['settings']['k'])} nearest image)", "rank", "path", "label",
                   "score")
        for r in res.outliers[:top]:
            t.add_row(str(r["rank"]), safe_str(r["path"]), r["label"] or "", f"{r['score']:.3f}")
        out.print(t)
    _print_rankings(res, top)
    if res.report_dir:
        out.print(styled("report -> [bold]{}[/bold] (report.md, report.html, scores.csv with every image, CSVs, "
                         "PNG galleries)", res.report_dir))


def _print_rankings(res, top: int) -> None:
    """The top of each score's ranking, flagged or not (a flagged row says so)."""
    from ..audit.report import RANKING_RANK, RANKING_TITLES

    for name, rows in res.rankings(top).items():
        title, score, a, b, flag = RANKING_TITLES[name]
        t = _table(title.format(n=len(rows)) + " (flagged or not)", "rank", "path", score, a, b, "flagged")
        for r in rows:
            t.add_row(str(r[RANKING_RANK[name]]), safe_str(r["path"]), _cell(r[score]), safe_str(_cell(r[a])),
                      safe_str(_cell(r[b])), "yes" if r[flag] not in (None, False) else "")
        out.print(t)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


_NUMERIC = ("group", "rank", "similarity", "score", "p(given)", "p(suggested)", "label_score", "outlier_score",
            "nearest_similarity", "outlier_percentile")


def _table(title: str, *columns: str) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        # paths fold onto a second line instead of an ellipsis: the user must be able to act on the exact path
        t.add_column(c, justify="right" if c in _NUMERIC else "left", overflow="fold",
                     no_wrap=c in _NUMERIC, min_width=12 if c == "path" else None)
    return t

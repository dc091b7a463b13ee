"""`featx fit [FEATURES]`: fit a classification head on extracted features and report honest validation scores."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, run_boundary
from .common import library_warnings, out, print_json, styled
from .tables import comparison_table, confusion_table, cv_line, fmt, metrics_table, per_class_table
from .plain_help import PlainHelpCommand

# Literal defaults (not imported) so that `featx --help` does not import numpy/sklearn; tests check they agree.
DEFAULT_FEATURES = Path("featx-out") / "features.npz"
DEFAULT_HEAD = Path("featx-out") / "head.skops"


@app.command("fit", cls=PlainHelpCommand)
@run_boundary
def fit_cmd(
    features: Path = typer.Argument(DEFAULT_FEATURES, help="Features file from `featx extract` (labelled)."),
    head: str = typer.Option("logistic", "--head", help="logistic | svm | svm-rbf | linear | knn | mlp | all (any case). all: every head, ranked by CV on the training rows (val does not choose), best one kept."),
    output: Path = typer.Option(DEFAULT_HEAD, "-o", "--output", help="Head file to write (.skops); reports go beside it."),
    C: Optional[float] = typer.Option(None, "--C", help="Fix the regularisation strength (ridge: alpha=1/(2C)) instead of a CV search."),
    k: Optional[int] = typer.Option(None, "--k", help="Fix k for the knn head instead of a CV search."),
    class_weight: Optional[str] = typer.Option(None, "--class-weight", help="'balanced' for imbalanced classes."),
    val_split: float = typer.Option(0.2, "--val-split", help="Stratified hold-out fraction when the features carry no val split."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validate on these features instead (same backbone)."),
    cv: int = typer.Option(5, "--cv", help="Folds of the CV search: 2 or more, or 0 = off."),
    seed: int = typer.Option(0, "--seed", help="Seed for the hold-out, the CV folds and the SVMs."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda: where the torch heads run (svm, mlp; logistic for large sets)."),
    backend: str = typer.Option("auto", "--backend", help="auto | sklearn | torch (logistic, svm; mlp is always torch) | stream (logistic, svm, linear: read the store chunk by chunk, memory ~ one shard; needs --C or --cv 0, no CV search). auto streams from 2^28 values (rows x features, e.g. 210k x 1,280) and there refuses the heads that need every row in memory (svm-rbf, knn, mlp, all) unless --backend sklearn/torch is named."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Parallel CV fits (1 or more; -1 = all cores)."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Temperature-scale on the validation split (needs 5+ validation images of every class, and a mistake among them): probabilities for every head, ECE (cross-fitted on val) and a reliability diagram in the report."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs (head, reports, PNGs) that featx did not write."),
    exclude: Optional[Path] = typer.Option(None, "--exclude", help="Leave out the images a `featx audit` CSV (duplicates: all but one per group) or a file of paths lists."),
    json_: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
):
    """Fit a head (logistic, SVM, ridge, k-NN, MLP) on features; report val/test scores, per-class table, confusion matrix."""
    from ..heads import fit_head

    with library_warnings():
        res = fit_head(features, head=head, output=output, C=C, k=k, class_weight=class_weight, val_split=val_split,
                       val=val, cv=cv, seed=seed, device=device, backend=backend, n_jobs=jobs, calibrate=calibrate,
                       overwrite=overwrite, exclude=exclude)
    if json_:
        print_json(res.to_dict())
        return
    if res.results:
        _print_comparison(res)
        out.print()
        out.print(styled("[bold]Best: {}[/bold]", res.kind))
    _print_one(res)
    if res.results:
        others = ", ".join(str(r.path) for r in res.results if r.path)
        if others:
            out.print(styled("[dim]every head: {}[/dim]", others))


def _print_one(res) -> None:
    t = res.training
    backbone = res.head.feature_meta.get("backbone") or "unknown backbone"
    params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.head.meta["params"].items())
    out.print(styled("[bold]{}[/bold] head ({}) on {} training samples x {} features ({}), fitted with {} on {} in {} s",
                     res.kind, params, t['n'], t['n_features'], backbone, t['backend'], t['device'],
                     f"{t['fit_seconds']:.2f}"))
    out.print(f"validated on {res.validation}")
    if t.get("excluded"):
        x = t["excluded"]
        by_split = ", ".join(f"{k} {v}" for k, v in x["by_split"].items() if v)
        if not x["excluded"]:  # an empty list (an audit that found no duplicates): no "left out 0 ... ()"
            out.print(f"nothing left out: {x['file']} lists no images")
        else:
            out.print(f"left out {x['excluded']} image(s) listed in {x['file']}"
                      + (f" ({by_split})" if by_split else ""))
    out.print(cv_line(res.cv))
    if res.head.calibration:
        out.print(_calibration_line(res.head.calibration))
    if res.selection:  # --head all: the kept head's score comes from rows that did not choose it
        out.print(f"chosen by {res.selection['how']}")
    out.print(metrics_table(res.held_out, title="Scores (held-out data)" if not res.selection else
                            "Scores of the kept head (held-out data that did not choose it)"))
    for name, m in res.held_out.items():
        out.print(per_class_table(m, title=f"Per class, {name}"))
        out.print(confusion_table(m, title=f"Confusion matrix, {name} (rows = true)"))
    out.print(styled("[dim]accuracy on the training rows themselves (not a score): {}[/dim]", fmt(t['training_data_accuracy'])))
    if res.path:
        out.print(styled("head -> [bold]{}[/bold]", res.path))
    if res.report_path:
        pngs = "confusion and reliability PNGs" if res.head.calibration else "confusion PNGs"
        out.print(f"report -> {res.report_path} (+ {pngs})")


def _calibration_line(cal: dict) -> str:
    """``calibrated (temperature 1.84, fitted on val): expected calibration error val 0.081 -> 0.031 cross-fitted
    (0.023 in-sample, on the rows that fitted T), test 0.090 -> 0.040``: the in-sample ECE is never the headline."""
    parts = []
    for split, e in cal.get("ece", {}).items():
        text = f"{split} {fmt(e.get('before'))} -> {fmt(e.get('after'))}"
        if e.get("after_in_sample") is not None:
            text += f" cross-fitted ({fmt(e['after_in_sample'])} in-sample, on the rows that fitted T)"
        elif e.get("after_cross_fitted") is not None:  # a head from before issue 22: "after" was in-sample
            text = (f"{split} {fmt(e.get('before'))} -> {fmt(e['after_cross_fitted'])} cross-fitted "
                    f"({fmt(e.get('after'))} in-sample, on the rows that fitted T)")
        parts.append(text)
    return (f"calibrated (temperature {cal['temperature']:.3g}, fitted on {cal.get('fitted_on', 'val')}): "
            f"expected calibration error {', '.join(parts)}")


def _print_comparison(res) -> None:
    split = res.selection_split or "val"
    sel = res.selection or {}
    rows = [dict(r.to_dict(), selection_score=sel.get("scores", {}).get(r.kind)) for r in res.results]
    metric = sel.get("metric", "accuracy").replace("_", " ")
    used = "val rows, all (half of them chose)" if sel.get("rows") else "not used to choose"
    cols = [("head", "head"), ("params", "params"), ("selection score", "selection_score"),
            ("CV std", "cv.std"), (f"{split} acc.", f"scores.{split}.accuracy"),
            (f"{split} bal. acc.", f"scores.{split}.balanced_accuracy"),
            (f"{split} macro-F1", f"scores.{split}.macro_f1")]
    if any("test" in r["scores"] for r in rows) and split != "test":
        cols.append(("test acc.", "scores.test.accuracy"))
    cols.append(("fit s", "training.fit_seconds"))
    table = comparison_table(rows, cols, title=f"Heads, sorted by their selection score ({metric}; how: below); "
                                               f"{split} columns: {used}")
    out.print(table)

"""`featx predict IMAGES`: classify a folder into a CSV/JSONL table, evaluate when labelled, optionally sort into folders."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .._io import safe_str
from .app import app, run_boundary
from .common import out, print_json, progress_bar, styled, warn
from .plain_help import PlainHelpCommand
from .tables import confusion_table, fmt, metrics_table, per_class_table

PLAN_LINES = 40  # sort actions listed in full on the terminal (dry run); the rest are counted
SKIP_LINES = 20  # folders/files discovery skipped, listed on stderr (as `featx extract` does); the rest are counted


@app.command("predict", cls=PlainHelpCommand)
@run_boundary
def predict_cmd(
    images: List[Path] = typer.Argument(..., help="Folder of images (class subfolders = labelled: accuracy, confusion matrix, gallery), or image files, or a list file (@list.txt or a .txt file, one path a line): their predictions are printed. Or a feature store from `featx extract` (.npz, .parquet, or a sharded folder with manifest.json): its features are scored by a head (.skops) fitted on the same backbone, weights, layer and crop size, with no network run; a sharded store shard by shard in bounded memory; same table, scores when the store has labels. For a store, --sort-into (and --min-confidence), --weights and --runtime torch/onnx are refused, --image-size only confirms the store's crop size, --device/--workers/--threads are ignored and --batch-size is the rows scored at once."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Head file (.skops) from `featx fit`, a run folder / model.json from `featx finetune` / `featx scratch`, or an .onnx file from `featx export` (runs in onnxruntime; torch not needed). Default: featx-out/head.skops."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Table to write. Default: featx-out/predictions.csv (.jsonl with --format jsonl) for a folder or a feature store; none for image files (printed)."),
    format_: Optional[str] = typer.Option(None, "--format", help="csv | jsonl (default: from the -o suffix, else csv)."),
    top_k: int = typer.Option(3, "--top-k", min=0, help="Top classes and scores per row."),
    sort_into: Optional[Path] = typer.Option(None, "--sort-into", help="Also copy each image into DIR/<predicted class>/."),
    copy: bool = typer.Option(False, "--copy", help="With --sort-into: copy the images (the default)."),
    link: bool = typer.Option(False, "--link", help="With --sort-into: hard-link (symlink across file systems) instead of copying."),
    move: bool = typer.Option(False, "--move", help="With --sort-into: move the images (the only mode that removes sources)."),
    min_confidence: Optional[float] = typer.Option(None, "--min-confidence", help="With --sort-into: images whose probability is below this go to DIR/_uncertain/. Needs a model that gives probabilities (refused otherwise): svm, svm-rbf and linear heads give decision scores unless fitted with `featx fit --calibrate`."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Predict and print the sort plan; write, copy and move nothing."),
    strict: bool = typer.Option(False, "--strict", help="Exit 6 if any image could not be read (after writing the rest) or a folder was skipped (before any work); with --sort-into, stop at the first file that cannot be sorted (exit 7)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (auto = CUDA when present)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per batch (default 32 CPU, 256 CUDA; capped to what memory holds)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Decoding processes (default: CPU count, at most 8); with the CPU runtime "
                                         "(onnxruntime), decoding threads (default: usable cores, at most 4)."),
    runtime: str = typer.Option("auto", "--runtime", help="auto | torch | onnx: how the network runs (auto = onnxruntime on the CPU, a graph built once and cached; torch on CUDA)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="onnxruntime threads (default: the cores this process may use)."),
    report_dir: Optional[Path] = typer.Option(None, "--report-dir", help="Labelled input: where confusion.png, misclassified.png, metrics.json go (default: <output stem>.report/)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow replacing existing output files (table, report files) that featx did not write."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Backbone weights file, for a head fitted on features from a local weights file."),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="auto (the model's own) or a number that only confirms the model's crop size: predict always uses the preprocessing recorded in the model, and another size is refused."),
    json_: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
):
    """Classify a folder of images (or image files, or a list of paths, or the features a store already holds): a CSV/JSONL table, counts per class, scores when the folder or store is labelled (images seen in training scored apart)."""
    from ..errors import FeatxError, UsageError
    from ..predict import predict_folder

    if copy + link + move > 1:
        raise UsageError("--copy, --link and --move exclude each other")
    if (copy or link or move) and sort_into is None:  # `--copy` alone was once answered "did you mean --top-k?"
        raise UsageError("--copy/--link/--move apply to sorting; add --sort-into DIR")
    mode = "move" if move else "link" if link else "copy"
    from ..data.filelist import is_file_source
    from ..features.sizing import parse_image_size
    from ..predict.from_store import is_feature_store

    source = images[0] if len(images) == 1 else list(images)
    # image files (yolo / timm style): print each prediction; a table only with -o. A store file gets its table.
    named = is_file_source(source) and not is_feature_store(source)
    if named and output is None:
        output = False
    image_size = parse_image_size(image_size)
    try:
        with progress_bar("predicting", unit="img") as update:
            res = predict_folder(
                source, model, output=output, format=format_, top_k=top_k, device=device, batch_size=batch_size,
                workers=workers, sort_into=sort_into, mode=mode, min_confidence=min_confidence, dry_run=dry_run,
                strict=strict, report_dir=report_dir, overwrite=overwrite, weights=weights, image_size=image_size,
                progress=update, runtime=runtime, threads=threads,
            )
    except FeatxError as exc:  # a failed sort or --strict: the run finished; show what it did, then the error
        if getattr(exc, "result", None) is None:
            raise
        _report(exc.result, json_, named)
        raise
    _report(res, json_, named)


def _report(res, json_: bool, named: bool = False) -> None:
    for w in res.warnings:
        warn(w)
    for k in res.skipped[:SKIP_LINES]:
        warn(f"skipped {k['path']}: {k['reason']}")
    if len(res.skipped) > SKIP_LINES:
        warn(f"... and {len(res.skipped) - SKIP_LINES} more skipped (--json lists them all)")
    for e in res.errors:
        warn(f"could not read {e['path']}: {e['reason']}")
    for a in res.sort_actions:
        if a.status == "failed":
            warn(f"could not sort {safe_str(str(a.source))}: {a.error}")
    if json_:
        d = res.to_dict()
        if named and res.output is None:  # no table was written: the predictions themselves are the answer
            d["rows"] = [_json_row(r) for r in res.rows]
        print_json(d)
        return
    if named:
        _print_rows(res)
    _print(res)


def _json_row(row: dict) -> dict:
    return {"path": safe_str(str(row["path"])), "label": row.get("label"),
            "confidence": None if row.get("confidence") is None else float(row["confidence"]),
            "top_k": [{"label": t["label"], "score": float(t["score"])} for t in row.get("top_k") or []],
            "error": row.get("error")}


def _print_rows(res) -> None:
    """One line per named image, as `yolo predict` and timm's inference script show them: path, class, score, top-k."""
    from rich.table import Table

    table = Table(title="Predictions", title_justify="left")
    for col, just in (("image", "left"), ("class", "left"), ("score", "right"), ("top classes", "left")):
        table.add_column(col, justify=just)
    for row in res.rows:
        if row.get("error"):
            table.add_row(safe_str(str(row["path"])), "(unreadable)", "", str(row["error"]), style="red")
            continue
        top = ", ".join(f"{t['label']} {fmt(float(t['score']))}" for t in row.get("top_k") or [])
        table.add_row(safe_str(str(row["path"])), str(row["label"]), fmt(float(row["confidence"])), top)
    out.print(table)


def _print(res) -> None:
    from rich.table import Table

    if res.already_sorted:  # nothing was left to classify: say so instead of "0 images classified"
        out.print(f"all {len(res.earlier_moves)} images were already sorted into {safe_str(str(res.sort_into))} by an "
                  "earlier --move that was stopped before writing its table; they are listed in the table "
                  "(sort_status 'moved by an earlier run')")
        if res.dry_run:
            out.print(styled("[yellow]dry run: nothing was written[/yellow]"))
        elif res.output is not None:
            out.print(styled("predictions -> [bold]{}[/bold]", res.output))
        return

    out.print(styled("{} images classified by {} on {} in {} s ({} img/s, {}); [bold]{}[/bold] unreadable{}",
                     res.n_classified, res.model, res.device, f"{res.seconds:.1f}", f"{res.images_per_s:.1f}",
                     res.runtime,
                     res.n_errors, f", {len(res.skipped)} skipped folders/files" if res.skipped else ""))
    conf = ("probability of the predicted class" if res.confidence_kind == "probability"
            else "decision score of the predicted class (not a probability; larger = more confident)")
    out.print(f"confidence = {conf}")
    table = Table(title="Predicted classes", title_justify="left")
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("share", justify="right")
    ok = max(1, res.n_images - res.n_errors)
    for cls, n in sorted(res.counts.items(), key=lambda t: (-t[1], t[0])):
        table.add_row(cls, str(n), f"{100 * n / ok:.1f}%")
    if res.n_errors:
        table.add_row("(unreadable)", str(res.n_errors), "", style="red")
    out.print(table)

    if res.labelled and res.metrics is not None:
        scores = {"all": res.metrics, **res.split_metrics} if res.split_metrics else {"all": res.metrics}
        if res.seen_metrics:  # issue 24.2: training images scored apart, never in the rows above
            scores = {("unseen" if k == "all" else k): v for k, v in scores.items()}
            scores["seen in training"] = res.seen_metrics
        against = "the store's labels" if res.runtime == "stored features" else "the folder labels"
        out.print(metrics_table(scores, title=f"Scores against {against}"))
        out.print(per_class_table(res.metrics, title="Per class" + (", unseen images" if res.seen_metrics else "")))
        out.print(confusion_table(res.metrics, title="Confusion matrix (rows = true)"))
        if res.report_dir:
            extra = f", {res.gallery_png.name}" if res.gallery_png else " (nothing misclassified, no gallery)"
            out.print(f"report -> {res.report_dir} (confusion.png{extra}, metrics.json)")

    elif res.labelled and res.seen_metrics:  # every labelled image trained or chose the model: no headline
        out.print(metrics_table({"seen in training": res.seen_metrics},
                                title="Scores against the folder labels (images the model was trained or chosen on)"))

    if res.sort_into is not None:
        _print_sort(res)
    if res.dry_run:
        out.print(styled("[yellow]dry run: nothing was written[/yellow]"))
    elif res.output is not None:
        out.print(styled("predictions -> [bold]{}[/bold]", res.output))


def _print_sort(res) -> None:
    verb = {"copy": "copy", "link": "link", "move": "move"}[res.sort_mode]
    if res.dry_run:
        below = f", below {fmt(res.min_confidence)} -> _uncertain" if res.min_confidence is not None else ""
        out.print(styled("[bold]Plan[/bold] ({} into {}{}):", verb, res.sort_into, below))
        for a in res.sort_actions[:PLAN_LINES]:
            state = "already there" if a.status == "already" else verb
            out.print(f"  {state}: {safe_str(str(a.source))} -> {safe_str(str(a.dest))}")
        if len(res.sort_actions) > PLAN_LINES:
            out.print(f"  ... and {len(res.sort_actions) - PLAN_LINES} more (--json lists them all)")
    counts = res.sort_counts()
    parts = []
    for folder, st in sorted(counts.items()):
        bits = [f"{n} {k}" for k, n in sorted(st.items())]
        parts.append(f"{folder}: {', '.join(bits)}")
    head = "would sort into" if res.dry_run else "sorted into"
    out.print(f"{head} {safe_str(str(res.sort_into))} ({verb}): " + ("; ".join(parts) if parts else "nothing to sort"))
    removed = res.removed_duplicates()
    if removed:
        out.print(f"{len(removed)} source file(s) removed because an identical file was already in the sort folder "
                  "(sort_status 'already there; ...' in the table)")
    if res.earlier_moves:
        out.print(f"{len(res.earlier_moves)} image(s) moved by an earlier, interrupted run are listed in the table "
                  "(sort_status 'moved by an earlier run')")

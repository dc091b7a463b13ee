"""`featx compare IMAGES`: frozen-feature heads vs fine-tuning vs scratch CNNs on one split, as a table and report;
with --shots, also as a curve of accuracy against training images per class."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .app import app, run_boundary
from .common import out, print_json, styled, warn
from .finetune import epoch_line, log_message
from .plain_help import PlainHelpCommand
from ..features.sizing import parse_image_size


@app.command("compare", cls=PlainHelpCommand)
@run_boundary
def compare_cmd(
    images: Path = typer.Argument(..., help="Labelled image folder: class subfolders, optionally inside train/ and val/."),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", "-b", help="Backbone for the heads and for fine-tuning."),
    arch: Optional[List[str]] = typer.Option(None, "--arch", help="Scratch architecture(s); repeat for several (default: lenet5 and resnet20)."),
    quick: bool = typer.Option(False, "--quick", help="Small budget: 4 fine-tuning epochs, 8 scratch epochs, 3-fold CV; --shots auto stops at 20 per class."),
    skip_heads: bool = typer.Option(False, "--skip-heads", help="Do not fit heads on frozen features."),
    skip_finetune: bool = typer.Option(False, "--skip-finetune", help="Do not fine-tune."),
    skip_scratch: bool = typer.Option(False, "--skip-scratch", help="Do not train CNNs from scratch."),
    shots: Optional[str] = typer.Option(None, "--shots", metavar="K,K,...|auto", help="Also train every method on K images per class drawn from the training split (e.g. 1,2,5,10,20,all; auto = 1,2,5,10,20,50,... below the smallest class) and draw learning_curve.png."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="With --shots: draws of the smallest K (of every K for the heads)."),
    budget: Optional[float] = typer.Option(None, "--budget", metavar="SECONDS", help="Cap the total time: fine-tuning and scratch runs that would not fit are skipped and listed; the heads (seconds in all) run first and always."),
    finetune_epochs: Optional[int] = typer.Option(None, "--finetune-epochs", min=1, help="Fine-tuning epochs (default 15, or 4 with --quick)."),
    scratch_epochs: Optional[int] = typer.Option(None, "--scratch-epochs", min=1, help="Scratch epochs (default 30, or 8 with --quick)."),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="Crop size for extraction and fine-tuning (default: the backbone's), or auto: the backbone's own unless the images are small, then a smaller one (as `featx extract`)."),
    no_pretrained: bool = typer.Option(False, "--no-pretrained", help="Random-init backbone (a sanity check, not a real comparison)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local weights file for the backbone."),
    val_split: float = typer.Option(0.2, "--val-split", help="Held-out fraction (stratified, seeded) when there is no val/ folder."),
    seed: int = typer.Option(0, "--seed", help="One seed for the split, the draws and every method."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Data-loading processes."),
    runtime: str = typer.Option("auto", "--runtime", help="auto | torch | onnx: how the network runs (auto = onnxruntime on the CPU, a graph built once and cached; torch on CUDA)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="onnxruntime threads (default: the cores this process may use)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="The report goes to RUNS_DIR/compare/NAME."),
    name: Optional[str] = typer.Option(None, "--name", help="Run folder name (default: exp, exp2, ...)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Reuse an existing --name folder (featx replaces only the files it wrote there)."),
    exist_ok: bool = typer.Option(False, "--exist-ok", hidden=True, help="Old name of --overwrite."),
    json_: bool = typer.Option(False, "--json", help="Print one entry per method (with --shots: the whole results.json document)."),
):
    """Is transfer learning worth it here? Heads on frozen features vs fine-tuning vs small CNNs from scratch."""
    from ..comparison import compare

    kw = {"archs": tuple(arch)} if arch else {}
    res = compare(
        images, backbone=backbone, quick=quick, skip_heads=skip_heads, skip_finetune=skip_finetune,
        skip_scratch=skip_scratch, finetune_epochs=finetune_epochs, scratch_epochs=scratch_epochs,
        image_size=parse_image_size(image_size), pretrained=not no_pretrained,
        weights=str(weights) if weights else None, val_split=val_split, seed=seed, device=device, workers=workers, runtime=runtime, threads=threads,
        runs_dir=str(runs_dir), name=name,
        exist_ok=overwrite or exist_ok, shots=shots, repeats=repeats, budget=budget, log=log_message,
        on_epoch=None if json_ else epoch_line, **kw,
    )
    if json_:
        print_json(res.to_dict() if res.curve is not None else res.methods())
        return
    out.print(_table(res))
    out.print("* best head kind / best scratch architecture")
    if res.curve is not None:
        out.print(_curve_table(res.curve, res))
        if res.curve.sentence:
            out.print(res.curve.sentence)
    for note in [*res.notes, *(res.curve.notes if res.curve is not None else [])]:
        warn(note)
    charts = [str(p) for p in (res.chart_path, res.curve_path) if p]
    out.print(styled("report: [bold]{}[/]{}", res.report_path, f", charts: {', '.join(charts)}" if charts else ""))


def _table(res) -> Table:
    from ..comparison.render import method_label

    majority = next((r.majority_rate for r in res.rows if r.majority_rate is not None), None)
    t = Table(title=f"validation: {res.n_val} images ({res.split})"
                    + (f"; majority-class rate {majority:.4f}" if majority is not None else ""))
    t.add_column("method", justify="left", no_wrap=True)
    for col in ("val accuracy", "balanced accuracy", "seconds", "trainable params"):
        t.add_column(col, justify="right")
    for r in res.rows:
        if r.skipped or r.error:
            t.add_row(r.method, styled("[yellow]skipped[/]" if r.skipped else "[red]failed[/]"), "",
                      f"{r.seconds:.1f}", "")
            continue
        label = method_label(r)
        acc = styled("[yellow]{} chance[/]", f"{r.accuracy:.4f}") if r.beats_chance is False else f"{r.accuracy:.4f}"
        t.add_row(label if r.best_in_family or r.family == "finetune" else styled("[dim]{}[/]", label),
                  acc, f"{r.balanced_accuracy:.4f}", f"{r.seconds:.1f}",
                  "-" if r.trainable_params is None else f"{r.trainable_params:,}")
    return t


def _curve_table(curve, res=None) -> Table:
    from ..comparison.render import draws_title, point_at_chance, point_cell

    at_chance = point_at_chance(res) if res is not None else (lambda p: False)
    points = curve.points()
    pts = {(p["method"], p["k"]): p for p in points}
    draws, with_n = draws_title(points)  # the draws that ran, not the --repeats asked for
    t = Table(title=f"validation accuracy by training images per class ({draws})")
    t.add_column("method", justify="left", no_wrap=True)
    for k in curve.ks:
        t.add_column(str(k), justify="right")
    t.add_column(f"all ({curve.per_class_all:.0f})", justify="right")
    for method, label in curve.labels.items():
        t.add_row(label, *[point_cell(pts.get((method, k)), compact=True, with_n=with_n,
                                      chance=at_chance(pts.get((method, k)))) for k in [*curve.ks, None]])
    return t

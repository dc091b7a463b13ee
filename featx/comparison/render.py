"""What `featx compare` writes in its run folder: results.json, report.md, accuracy.png and learning_curve.png."""
from __future__ import annotations

from typing import Optional

from .._io import write_json, write_markdown
from .types import CompareResult


def write_outputs(result: CompareResult) -> None:
    """The charts first (a plotting problem becomes a note, never a lost table), then results.json and report.md."""
    from .. import report

    run_dir = result.run_dir
    chart_rows = [{"method": r.method, "accuracy": r.accuracy} for r in result.rows if r.ok]
    try:
        result.chart_path = report.save_bar_chart_png(chart_rows, run_dir / "accuracy.png", key="accuracy",
                                                      label_key="method",
                                                      title=f"validation accuracy ({result.n_val} images)")
    except Exception as exc:  # noqa: BLE001 - matplotlib raises many kinds; the numbers matter more
        result.notes.append(f"bar chart not drawn: {exc}")
    if result.curve is not None:
        try:
            result.curve_path = report.save_shots_curve_png(
                result.curve.points(), run_dir / "learning_curve.png", all_label=f"all ({result.curve.per_class_all:.0f})",
                sizes=[*result.curve.ks, result.curve.per_class_all],
                title=f"validation accuracy ({result.n_val} images) vs training images per class")
        except Exception as exc:  # noqa: BLE001
            result.notes.append(f"learning curve not drawn: {exc}")
    write_json(run_dir / "results.json", result.to_dict())
    write_markdown(run_dir / "report.md", render_report(result))
    write_html(result)


def _f(v, nd=4) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def method_label(r) -> str:
    """The method with its mark: the best of a family that has several rows (head kinds, scratch archs) gets ``*``."""
    return r.method + (" *" if r.best_in_family and r.family != "finetune" else "")


def render_report(result: CompareResult) -> str:
    s = result.settings
    lines = ["# featx compare", "",
             f"- images: {result.n_train} train, {result.n_val} validation ({result.split}); seed {s.seed}",
             f"- backbone for heads and fine-tuning: `{s.backbone}`" + (" (random init)" if not s.pretrained else ""),
             f"- budget: {'quick' if s.quick else 'default'}"
             + (f", --budget {s.budget:g} s" if s.budget else "") + f"; total wall time {result.seconds:.1f} s", "",
             f"- majority-class rate of the validation images: {_f(_majority(result))} (always answering the "
             f"commonest class); a method not clearly above it is marked **chance**", "",
             "| method | val accuracy | balanced accuracy | seconds | trainable params |", "|---|---|---|---|---|"]
    for r in result.rows:
        if r.skipped:
            lines.append(f"| {r.method} | skipped ({r.skipped}) | | | |")
        elif r.error:
            lines.append(f"| {r.method} | failed: {_cell(r.error)} | | {r.seconds:.1f} | |")
        else:
            tp = "-" if r.trainable_params is None else f"{r.trainable_params:,}"
            mark = " **chance**" if r.beats_chance is False else ""
            lines.append(f"| {method_label(r)} | {_f(r.accuracy)}{mark} | {_f(r.balanced_accuracy)} | {r.seconds:.1f} "
                         f"| {tp} |")
    lines += ["", "`*` best head kind / best scratch architecture on these validation images.", ""]
    if result.chart_path:
        lines += ["![validation accuracy](accuracy.png)", ""]
    lines += ["Heads: features extracted once from the frozen backbone (their time includes the extraction), "
              "one row per head kind. Fine-tuning and scratch rows report their best epoch on the same "
              "validation images. Trainable parameters of a head are its learned coefficients (k-NN stores "
              "the training features and learns none).", ""]
    if result.curve is not None:
        lines += render_curve(result)
    if result.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in result.notes], ""]
    lines += ["## Artifacts (each works with `featx predict --model`)", ""]
    lines += [f"- {r.method}: `{r.artifact}`" for r in result.rows if r.artifact and r.ok]
    lines.append("")
    return "\n".join(lines)


def _majority(result: CompareResult) -> Optional[float]:
    return next((r.majority_rate for r in result.rows if r.majority_rate is not None), None)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def render_curve(result: CompareResult) -> list:
    """The --shots section: the sentence, a method x size table (mean ± sd over draws), the plot, the rule."""
    c = result.curve
    pts = {(p["method"], p["k"]): p for p in c.points()}
    state = {}
    for r in c.runs:
        if r.accuracy is None:
            state.setdefault((r.method, r.k), "skipped" if r.skipped else "failed")
    cols = [*c.ks, None]
    head = [str(k) for k in c.ks] + [f"all ({c.per_class_all:.0f})"]
    lines = ["## Accuracy against training images per class (`--shots`)", "", c.sentence or "(no curve to read)", "",
             "| method | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
    at_chance = point_at_chance(result)
    for method, label in c.labels.items():
        cells = [point_cell(pts.get((method, k)), state.get((method, k)), chance=at_chance(pts.get((method, k))))
                 for k in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Mean validation accuracy over the draws (± standard deviation, n = draws); the same "
              f"{len(c.val_images)} validation images for every cell; **chance**: a mean not clearly above the "
              f"majority-class rate {_f(_majority(result))}."]
    if result.curve_path:
        lines += ["", "![learning curve](learning_curve.png)"]
    lines += ["", f"How: k images per class are drawn (seeded) from the training split only; the smallest size is "
              f"drawn {c.repeats} times (the head: every size; n in each cell counts the draws that ran), each "
              f"draw's subsets nested. The head is the kind best on the whole split, refitted per subset on the "
              f"features extracted once; below 5 images per class its parameter is fixed (the kind's default; "
              f"k-NN 1 or 3 neighbours), from 5 it is cross-validated. Fine-tuning and scratch runs keep the full "
              f"run's recipe and epochs, each epoch filled with copies of the subset to the full split's size, so "
              f"every size costs about the same.", ""]
    lines += [f"- {n}" for n in c.notes] + ([""] if c.notes else [])
    return lines


def point_at_chance(result: CompareResult):
    """-> f(point) -> whether its mean accuracy fails featx.report's chance rule on the shared validation images."""
    from ..report import beats_chance

    majority, n = _majority(result), result.n_val

    def at_chance(p: Optional[dict]) -> bool:
        return (p is not None and majority is not None and n > 0
                and beats_chance(round(float(p["mean"]) * n), n, majority) is False)
    return at_chance


def point_cell(p: Optional[dict], state: Optional[str] = None, compact: bool = False, with_n: bool = True,
               chance: bool = False) -> str:
    """A curve point as text: mean, and ± standard deviation (n = draws) where there were several draws; "chance"
    after a mean that does not clearly beat the majority-class rate."""
    if p is None:
        return state or "-"
    mark = (" chance" if compact else " **chance**") if chance else ""
    if p["n"] == 1:
        return f"{p['mean']:.3f}{mark}"
    if compact:
        return f"{p['mean']:.2f}±{p['std']:.2f}" + (f" (n={p['n']})" if with_n else "") + mark
    return f"{p['mean']:.3f} ± {p['std']:.3f} (n={p['n']})" + mark


def draws_title(points: list) -> tuple:
    """(words for a curve table's title, whether each cell must give its n): the draws that ran, never the planned
    --repeats (a --budget may have skipped some)."""
    ns = sorted({p["n"] for p in points if p["k"] is not None and p["n"] > 1})
    if not ns:
        return "one draw per size", False
    if len(ns) == 1:
        return f"mean±sd over {ns[0]} draws where a size has several", False
    return "mean±sd over the draws that ran (n)", True


def write_html(result: CompareResult) -> None:
    """report.html beside report.md: the same summary and table (sortable) and the charts inline, one file."""
    from ..report_html import compare_page

    rows = [[method_label(r), r.family, r.accuracy, r.balanced_accuracy, round(r.seconds, 1), r.trainable_params,
             r.skipped and f"skipped ({r.skipped})" or r.error and f"failed: {r.error}" or "ok", r.artifact]
            for r in result.rows]
    s = result.settings
    compare_page(result.run_dir / "report.html", title="featx compare",
                 summary=[f"images: {result.n_train} train, {result.n_val} validation ({result.split})",
                          f"backbone for heads and fine-tuning: {s.backbone}" if s else "",
                          f"total wall time {result.seconds:.1f} s"],
                 columns=["method", "family", "val accuracy", "balanced accuracy", "seconds", "trainable params",
                          "status", "artifact"], rows=rows,
                 numeric=("val accuracy", "balanced accuracy", "seconds", "trainable params"),
                 charts=[(result.chart_path, "validation accuracy"), (result.curve_path, "learning curve")],
                 notes=result.notes)

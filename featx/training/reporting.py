"""The report callback: at the end of a run, plots (through featx.report) and ``report.md`` (featx._io.write_markdown)."""
from __future__ import annotations

import json
from pathlib import Path

from .._io import safe_str, write_markdown
from .callbacks import METRIC_FIELDS
from .result import TrainResult
from .trainer import Callback, Trainer

REPORT_FILES = ("report.md", "learning_curve.png", "confusion.png", "confusion-test.png")


class RunReport(Callback):
    """``learning_curve.png``, ``confusion.png`` (best weights, validation), ``confusion-test.png`` and ``report.md``.

    ``make_result(trainer)`` builds the :class:`TrainResult` the report describes (the same one the caller gets).
    """

    def __init__(self, run_dir: Path, make_result, title: str, split_how: str, warnings: list):
        self.run_dir, self.make_result, self.title = Path(run_dir), make_result, title
        self.split_how, self.warnings = split_how, list(warnings)

    def on_fit_end(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            write_run_report(self.run_dir, self.make_result(trainer), self.title, self.split_how, self.warnings,
                             trainer.classes)


def write_run_report(run_dir: Path, result: TrainResult, title: str, split_how: str, warnings: list,
                     classes: list) -> None:
    """Plots and report.md; a plot that fails (fonts, backend) is a note, never a lost training run."""
    from .. import report

    notes = []
    try:
        report.save_learning_curve_png(result.rows, run_dir / "learning_curve.png")
    except Exception as exc:  # plotting must not fail a finished run
        notes.append(f"learning curve not drawn: {exc}")
    for metrics, name, where in ((result.metrics, "confusion.png", "validation"),
                                 (result.test_metrics, "confusion-test.png", "test")):
        if not metrics:
            continue
        try:
            report.save_confusion_png(metrics, run_dir / name, title=f"{title}: best epoch {result.best['epoch']} "
                                                                      f"on {where}")
        except Exception as exc:
            notes.append(f"{name} not drawn: {exc}")
    text = render_report(run_dir, result, title, split_how, classes, [*warnings, *notes])
    write_markdown(run_dir / "report.md", safe_str(text))  # undecodable file names: U+FFFD, not a crash


def _fmt(v, nd=4) -> str:
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _g(v) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def _per_class(metrics: dict, heading: str) -> list:
    if not (metrics and isinstance(metrics.get("per_class"), dict)):
        return []
    lines = [f"## Per class ({heading})", "", "| class | precision | recall | f1 | support |", "|---|---|---|---|---|"]
    for c, pc in metrics["per_class"].items():
        lines.append(f"| {c} | {_fmt(pc.get('precision'), 3)} | {_fmt(pc.get('recall'), 3)} | "
                     f"{_fmt(pc.get('f1'), 3)} | {_fmt(pc.get('support'))} |")
    return lines + [""]


def _header(run_dir: Path, r: TrainResult, title: str, split_how: str, classes: list) -> list:
    status = ("finished" + (" (early stopping)" if r.stopped_early else "")) if r.completed else \
        "stopped before the last epoch; continue with `--resume`"
    lines = [
        f"# featx {r.kind}: {title}", "",
        f"- run folder: `{run_dir}`",
        f"- status: {status}",
        f"- classes ({len(classes)}): {', '.join(map(str, classes))}",
        f"- images: {r.n_train} train, {r.n_val} validation, {r.n_test} test; validation: {split_how}",
        f"- best epoch: {_fmt(r.best['epoch'])} of {len(r.rows)} run ({r.best.get('phase') or '-'} phase); "
        f"val accuracy {_fmt(r.best['accuracy'])}, balanced accuracy {_fmt(r.best['balanced_accuracy'])}"
        + ("; these weights were restored at the end" if r.restored_best else ""),
    ]
    if r.test_metrics:
        t = r.test_metrics
        lines.append(f"- test (scored once, best weights): accuracy {_fmt(t['accuracy'])}, balanced accuracy "
                     f"{_fmt(t['balanced_accuracy'])}, {t['n']} images")
    lines += _chance_lines(r)
    lines += [f"- trainable parameters: {r.trainable_params:,} of {r.total_params:,}; precision {r.precision}",
              f"- wall time: {r.seconds:.1f} s", ""]
    return lines


def _chance_lines(r: TrainResult) -> list:
    """The majority-class rate beside each score, and a warning where the model does not clearly beat it."""
    from ..report import metrics_chance_note

    lines = []
    for what, m in (("val", r.metrics), ("test", r.test_metrics)):
        if m and m.get("majority_rate") is not None:
            note = metrics_chance_note(m, f"{what} accuracy")
            lines.append(f"- {what} majority-class rate (always answering the commonest class): "
                         f"{_fmt(m['majority_rate'])}" + (f"; **{note}**: not a result" if note else ""))
    return lines


def render_report(run_dir: Path, r: TrainResult, title: str, split_how: str, classes: list, notes: list) -> str:
    lines = _header(run_dir, r, title, split_how, classes)
    if r.notes:
        lines += ["## Outcome", ""] + [f"- {n}" for n in r.notes] + [""]
    lines += _per_class(r.metrics, "best weights, validation images")
    lines += _per_class(r.test_metrics, "best weights, test images")
    lines += ["## Epochs", "", "| " + " | ".join(METRIC_FIELDS) + " |", "|" + "---|" * len(METRIC_FIELDS)]
    lines += ["| " + " | ".join(_g(row.get(k)) for k in METRIC_FIELDS) + " |" for row in r.rows]
    lines += ["", "## Files", "",
              f"- `model.json` + `best.safetensors`: the model (`featx predict IMAGES --model {run_dir}`)",
              "- `last.safetensors`, `resume.safetensors`: the last epoch, for `--resume`",
              "- `metrics.csv`, `learning_curve.png`, `confusion.png`"
              + (", `confusion-test.png`" if r.test_metrics else "") + ", `config.json`", ""]
    if r.skipped:
        lines += [f"## Skipped images ({len(r.skipped)})", "", "Could not be decoded; not used for training or "
                  "evaluation:", ""]
        lines += [f"- `{p}`: {why}" for p, why in r.skipped[:200]]
        if len(r.skipped) > 200:
            lines.append(f"- ... and {len(r.skipped) - 200} more")
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {w}" for w in notes] + [""]
    lines += ["## Settings", "", "```json", json.dumps(r.config, indent=2, default=str),
              "```", ""]
    return "\n".join(lines)

"""Metrics and plots shared by every command that scores a model: metrics dicts, confusion matrix, curves, galleries, bars.

Everything here is plain data in, JSON-able dicts or PNG files out; nothing imports typer/rich. matplotlib is imported
lazily (with the Agg backend, so plotting works on headless machines) and every PNG is written atomically.
Any name a file system allows must render: every label drawn goes through `_label` (bytes that are not UTF-8 become
U+FFFD, which matplotlib's font code otherwise rejects with a TypeError) and mathtext is off (a file named
``x$\\frac{$.jpg`` is text, not a formula that fails to parse).
"""
from __future__ import annotations

import functools
import io
import math
import os
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from ._io import atomic_write, safe_str, stamp, write_json, written_by_featx

__all__ = [
    "classification_metrics",
    "chance_check",
    "beats_chance",
    "summary",
    "save_confusion_png",
    "save_learning_curve_png",
    "save_gallery_png",
    "save_bar_chart_png",
    "evaluation_files",
    "save_evaluation",
]

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "n", "majority_rate", "beats_chance")

# When does an accuracy "clearly beat" the majority-class rate (what always answering the commonest class scores)?
# Both: a one-sided binomial test rejects "no better than the majority rate" at 1 % (small folders: a few lucky
# rows are not a signal; at 0.1 % hymenoptera's ResNet-20, 0.660 against a 0.542 majority on 153 photos, p = 0.002,
# read "at chance level", which overstates it), and the model closes at least a tenth of the gap from that rate to perfect accuracy (large
# sets: 50.3 % against 50.0 % is "significant" on 100,000 rows and still useless). The one rule for every score featx
# prints (fit, predict, finetune, scratch, compare, --shots) and for audit's label check (issue 24.1; issue 22.10:
# random features gave 24,846 "label errors" without a word; issue 24: a LeNet calling every photo "bees" was listed
# as a result).
CHANCE_ALPHA = 1e-2
CHANCE_GAP = 0.10


def majority_rate(y_true: Sequence) -> float:
    """Share of the commonest true class: the accuracy of always answering it (NaN when there are no labels)."""
    y = np.asarray(y_true).astype(str)
    return float(np.unique(y, return_counts=True)[1].max() / len(y)) if len(y) else float("nan")


def beats_chance(correct: int, n: int, majority: float) -> Optional[bool]:
    """Does ``correct`` of ``n`` clearly beat the majority-class rate ``majority``? (the rule above; None for n = 0)"""
    if not n or majority is None or not math.isfinite(majority):
        return None
    if majority >= 1.0:  # one class only: nothing to beat, nothing learned
        return False
    from scipy.stats import binomtest

    correct = int(round(correct))
    return bool(binomtest(correct, int(n), float(majority), alternative="greater").pvalue < CHANCE_ALPHA
                and correct / n >= majority + CHANCE_GAP * (1.0 - majority))


def chance_note(accuracy, majority, balanced=None, what: str = "accuracy") -> str:
    """The one sentence featx prints wherever a score does not clearly beat the majority-class rate."""
    bal = f" (balanced accuracy {balanced:.3f})" if balanced is not None and math.isfinite(balanced) else ""
    return (f"at chance level: {what} {accuracy:.3f}{bal} is not clearly above the majority-class rate "
            f"{majority:.3f}, what always answering the commonest class scores")


def metrics_chance_note(metrics: Mapping, what: str = "accuracy") -> Optional[str]:
    """`chance_note` for a metrics dict (classification_metrics or its summary) that does not beat chance, else None."""
    if not metrics or metrics.get("beats_chance") is not False:
        return None
    return chance_note(metrics["accuracy"], metrics["majority_rate"], metrics.get("balanced_accuracy"), what)


def chance_check(y_true: Sequence, y_pred: Sequence) -> dict:
    """``{majority_rate, balanced_accuracy, beats_chance, note}`` for predictions against true labels: THE chance rule.

    ``beats_chance`` is None when there is nothing to judge (no rows); ``note`` is the warning text when the model
    does not clearly beat the majority-class rate, else None.
    """
    from sklearn.metrics import balanced_accuracy_score

    y_true = np.asarray(y_true).astype(str)
    y_pred = np.asarray(y_pred).astype(str)
    n = len(y_true)
    majority = majority_rate(y_true)
    if n:
        with warnings.catch_warnings():  # a class never predicted warns about y_pred's labels; the score stands
            warnings.simplefilter("ignore")
            balanced = float(balanced_accuracy_score(y_true, y_pred))
    else:
        balanced = float("nan")
    correct = int((y_true == y_pred).sum())
    verdict = beats_chance(correct, n, majority)
    note = chance_note(correct / n, majority, balanced) if verdict is False else None
    return {"majority_rate": majority, "balanced_accuracy": balanced, "beats_chance": verdict, "note": note}


def classification_metrics(y_true: Sequence, y_pred: Sequence, classes: Sequence | None = None) -> dict:
    """Accuracy, balanced accuracy, macro-F1, a per-class table and the confusion matrix (rows = true class).

    ``classes`` fixes the row/column order; labels seen in ``y_true``/``y_pred`` but missing from it are appended
    (sorted) so that no sample silently drops out of the matrix. Balanced accuracy and macro-F1 average over the
    classes that actually occur in ``y_true`` (a class with no true samples has no recall to average), which is
    sklearn's ``balanced_accuracy_score`` and ``f1_score(average="macro", labels=<those classes>)``.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(y_true).astype(str)
    y_pred = np.asarray(y_pred).astype(str)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {len(y_true)} entries but y_pred has {len(y_pred)}")
    order = [str(c) for c in (classes if classes is not None else [])]
    order += sorted((set(y_true.tolist()) | set(y_pred.tolist())) - set(order))
    n, k = int(len(y_true)), len(order)
    if n == 0 or k == 0:  # sklearn refuses empty input; an empty evaluation is NaN scores, not a crash
        cm = np.zeros((k, k), dtype=np.int64)
        precision = recall = f1 = np.zeros(k)
    else:
        with warnings.catch_warnings():  # sklearn warns about any 1x1 matrix, even when `labels` lists every class
            warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
            cm = confusion_matrix(y_true, y_pred, labels=order)
        precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=order, zero_division=0)
    support = cm.sum(axis=1)
    present = support > 0
    majority = float(support.max() / n) if n else float("nan")
    correct = int(np.trace(cm))
    return {
        "accuracy": float(np.trace(cm) / n) if n else float("nan"),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "n": n,
        "majority_rate": majority,  # accuracy of always answering the commonest true class
        "beats_chance": beats_chance(correct, n, majority),  # the chance_check rule
        "classes": order,
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(order)
        },
        "confusion": cm.astype(np.int64).tolist(),
    }


def summary(metrics: Mapping) -> dict:
    """The four headline numbers of a metrics dict (what ``--json`` prints per split)."""
    return {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}


# --------------------------------------------------------------------------------------------------- plotting


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless: never try to open a window
    import matplotlib.pyplot as plt

    return plt


def _label(x) -> str:
    """Any value as text matplotlib can draw."""
    return safe_str(str(x))


def _plain_text(fn):
    """Draw every text of the figure literally: no mathtext parsing of ``$...$`` in file or class names."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib

        _plt()
        with matplotlib.rc_context({"text.parse_math": False}):
            return fn(*args, **kwargs)
    return wrapper


def _save(fig, path) -> Path:
    """Render to memory, then write atomically (a crash never leaves half a PNG at ``path``)."""
    plt = _plt()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight", metadata={"Software": stamp()})
    finally:
        plt.close(fig)
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
    return path


@_plain_text
def save_confusion_png(metrics: Mapping, path, title: str | None = None, *, normalize: bool = False) -> Path:
    """Confusion matrix heat map (rows = true, columns = predicted) with counts in the cells.

    Colours show row-normalised recall so that small classes are as visible as large ones; the numbers stay counts
    (or row fractions with ``normalize=True``). Cell labels are dropped above 30 classes, where they would overlap.
    """
    plt = _plt()
    classes = [_label(c) for c in metrics["classes"]]
    cm = np.asarray(metrics["confusion"], dtype=float).reshape(len(classes), len(classes))
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(classes)
    size = min(max(4.0, 0.45 * k + 2.5), 24.0)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=100)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(classes, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center", fontsize=8)
    ax.set_yticklabels(classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                val = frac[i, j] if normalize else cm[i, j]
                text = f"{val:.2f}" if normalize else f"{int(val)}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if frac[i, j] > 0.5 else "black")
    if title is None:
        acc = metrics.get("accuracy")
        title = "confusion matrix" + (f" (accuracy {acc:.3f}, n={metrics.get('n')})" if acc is not None else "")
    ax.set_title(_label(title))
    return _save(fig, path)


@_plain_text
def save_learning_curve_png(rows: Iterable[Mapping], path, title: str | None = None) -> Path:
    """Loss (train and val) and val accuracy per epoch, from rows of ``{epoch, train_loss, val_loss, val_accuracy}``.

    Missing or ``None`` values are skipped, so a run without validation still gets its training loss plotted.
    """
    plt = _plt()
    rows = list(rows)

    def series(key):
        xs, ys = [], []
        for i, r in enumerate(rows):
            v = r.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
                continue
            xs.append(float(r.get("epoch", i + 1)))
            ys.append(float(v))
        return xs, ys

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for key, style in (("train_loss", "-o"), ("val_loss", "-s")):
        xs, ys = series(key)
        if xs:
            ax1.plot(xs, ys, style, markersize=3, label=key.replace("_", " "))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend()
    xs, ys = series("val_accuracy")
    if xs:
        ax2.plot(xs, ys, "-o", markersize=3, color="tab:green", label="val accuracy")
        best = int(np.argmax(ys))
        ax2.annotate(f"best {ys[best]:.3f}", (xs[best], ys[best]), textcoords="offset points", xytext=(0, 8), ha="center")
        ax2.legend()
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    if title:
        fig.suptitle(_label(title))
    fig.tight_layout()
    return _save(fig, path)


def _item_fields(item) -> tuple:
    if isinstance(item, Mapping):
        path = item.get("path", item.get("image"))
        return path, item.get("true"), item.get("pred"), item.get("confidence")
    path, true, pred, *rest = item
    return path, true, pred, (rest[0] if rest else None)


def _thumbnail(path, size: int):
    """A square RGB thumbnail, or None when the file cannot be read (the caller draws a grey tile)."""
    try:
        try:
            from .data.decode import load_rgb  # EXIF orientation as the model saw it, when available
        except ImportError:  # pragma: no cover - decode module written concurrently
            load_rgb = None
        if load_rgb is not None:
            img = load_rgb(path)
        else:  # pragma: no cover
            from PIL import Image

            with Image.open(path) as im:
                img = im.convert("RGB")
        img = img.copy()
        img.thumbnail((size, size))
        return np.asarray(img)
    except Exception:  # unreadable, truncated, missing: a gallery must still render
        return None


@_plain_text
def save_gallery_png(items: Iterable, path, title: str = "", *, thumb: int = 128, columns: int = 6) -> Path:
    """Thumbnails with ``true -> pred (confidence)`` captions (e.g. the worst misclassifications).

    ``items`` are dicts with ``path`` (or ``image``), ``true``, ``pred``, ``confidence``, or tuples in that order.
    An image that cannot be read is shown as a grey tile with its caption, so the gallery never fails on one file.
    """
    plt = _plt()
    items = list(items)
    n = len(items)
    cols = max(1, min(columns, n))
    nrows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(2.2 * cols, 2.5 * nrows + 0.4), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if n == 0:
        axes[0, 0].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    for ax, item in zip(axes.ravel(), items):
        p, true, pred, conf = _item_fields(item)
        img = _thumbnail(p, thumb) if p is not None else None
        if img is None:
            ax.imshow(np.full((thumb, thumb, 3), 160, dtype=np.uint8))
            ax.text(thumb / 2, thumb / 2, "unreadable", ha="center", va="center", fontsize=8)
        else:
            ax.imshow(img)
        caption = f"{_label(true)} -> {_label(pred)}" if true is not None else _label(pred)
        if conf is not None:
            try:
                caption += f" ({float(conf):.2f})"
            except (TypeError, ValueError):
                pass
        name = _label(os.path.basename(str(p))) if p is not None else ""
        wrong = true is not None and str(true) != str(pred)
        ax.set_title(f"{caption}\n{name[:28]}", fontsize=7, color="tab:red" if wrong else "black")
    if title:
        fig.suptitle(_label(title))
    fig.tight_layout()
    return _save(fig, path)


@_plain_text
def save_bar_chart_png(rows: Sequence[Mapping], path, key: str = "accuracy", label_key: str = "name",
                       title: str | None = None) -> Path:
    """Horizontal bars of ``row[key]`` labelled by ``row[label_key]``, best at the top (e.g. comparing heads)."""
    plt = _plt()
    data = [(_label(r.get(label_key, "?")), r.get(key)) for r in rows]
    data = [(lab, float(v)) for lab, v in data if v is not None and not (isinstance(v, float) and math.isnan(v))]
    data.sort(key=lambda t: t[1])  # barh draws bottom-up: ascending puts the best on top
    fig, ax = plt.subplots(figsize=(7, max(2.0, 0.45 * len(data) + 1.2)), dpi=100)
    if data:
        labels, values = zip(*data)
        bars = ax.barh(range(len(values)), values, color="tab:blue")
        ax.set_yticks(range(len(values)))
        ax.set_yticklabels(labels)
        hi = max(values)
        for b, v in zip(bars, values):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:.3f}", va="center", fontsize=8)
        if min(values) >= 0:  # scores in [0, 1] read best on a fixed axis; anything else keeps matplotlib's
            ax.set_xlim(0, max(1.0, hi) * 1.12)
    else:
        ax.text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(key.replace("_", " "))
    ax.set_title(_label(title or key.replace("_", " ")))
    fig.tight_layout()
    return _save(fig, path)


@_plain_text
def curve_series(pts: Sequence[Mapping], sizes: Sequence[float] = ()) -> tuple:
    """One method's curve as arrays ``(x, mean, min, max)``, sorted by x, with NaN at each of ``sizes`` (images per
    class the curve was planned at) that has no point, so that the line breaks there instead of joining its
    neighbours across a size that was skipped or failed."""
    by_x = {float(p["images_per_class"]): p for p in pts}
    xs = sorted(set(by_x) | {float(s) for s in sizes})
    nan = float("nan")
    rows = [(x, float(by_x[x]["mean"]), float(by_x[x].get("min", by_x[x]["mean"])),
             float(by_x[x].get("max", by_x[x]["mean"]))) if x in by_x else (x, nan, nan, nan) for x in xs]
    return tuple(np.array(c, dtype=float) for c in zip(*rows)) if rows else (np.zeros(0),) * 4


def save_shots_curve_png(points: Sequence[Mapping], path, *, all_label: str = "all", title: str | None = None,
                         sizes: Sequence[float] = ()) -> Path:
    """Accuracy against training images per class (log x), one line per method, min-max bars where there were
    several draws. ``points``: ``{label, k (None = all), images_per_class, mean, min, max, n}`` (``featx compare
    --shots``); ``sizes``: every images-per-class value the curve was planned at (a line breaks where its method
    has no point)."""
    plt = _plt()
    series: dict = {}
    for p in points:
        series.setdefault(_label(p.get("label", p.get("method", "?"))), []).append(p)
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=100)
    ticks: dict = {}
    for i, (label, pts) in enumerate(series.items()):
        x, y, lo, hi = curve_series(pts, sizes)
        ax.errorbar(x * (1 + 0.015 * i), y, yerr=[y - lo, hi - y], fmt="-o", markersize=4, capsize=3, label=label)
        for p in pts:
            ticks[float(p["images_per_class"])] = all_label if p.get("k") is None else f"{int(p['k'])}"
    ax.set_xscale("log")
    if ticks:
        ax.set_xticks(sorted(ticks), [ticks[t] for t in sorted(ticks)])
        ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("validation accuracy")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(_label(title or "accuracy vs training images per class"), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------- evaluation
EVALUATION_FILES = {"confusion": "confusion.png", "gallery": "misclassified.png", "metrics": "metrics.json"}
GALLERY_SIZE = 24  # most confidently misclassified images shown in the gallery PNG


def evaluation_files(folder) -> dict:
    """{"confusion", "gallery", "metrics"} -> the paths `save_evaluation` may write in ``folder`` (checked up front)."""
    return {key: Path(folder) / name for key, name in EVALUATION_FILES.items()}


def save_evaluation(folder, metrics: Mapping, mistakes: Iterable[Mapping], *, info: Optional[Mapping] = None,
                    extra: Optional[Mapping] = None, score_name: str = "confidence",
                    what: str = "predictions vs labels") -> dict:
    """Write the report of scoring a model on labelled images into ``folder``.

    ``confusion.png``; ``misclassified.png``, the `GALLERY_SIZE` most confident mistakes (a gallery an earlier run
    left is removed when nothing is misclassified now, so the folder never mixes runs); ``metrics.json`` with
    ``info``, the headline scores, per-class table, confusion matrix, ``extra`` and every mistake.
    ``mistakes``: ``{"path": as listed, "file": image to show, "true", "pred", "confidence"}``.
    Returns ``{"confusion": path, "gallery": path or None, "metrics": path}``.
    """
    files = evaluation_files(folder)
    mistakes = sorted(mistakes, key=lambda m: -m["confidence"])
    out = {"confusion": save_confusion_png(
        metrics, files["confusion"], title=f"{what} (accuracy {metrics['accuracy']:.3f}, n={metrics['n']})"),
        "gallery": None}
    shown = mistakes[:GALLERY_SIZE]
    if shown:
        out["gallery"] = save_gallery_png(
            [{"path": m.get("file", m["path"]), "true": m["true"], "pred": m["pred"], "confidence": m["confidence"]}
             for m in shown], files["gallery"],
            title=f"most confidently misclassified ({len(shown)} of {len(mistakes)}), true -> predicted ({score_name})")
    elif files["gallery"].is_file() and written_by_featx(files["gallery"]):
        files["gallery"].unlink()
    doc = {**(info or {}), **summary(metrics), "per_class": metrics["per_class"], "classes": metrics["classes"],
           "confusion": metrics["confusion"], **(extra or {}),
           "misclassified": [{k: m[k] for k in ("path", "true", "pred", "confidence")} for m in mistakes]}
    write_json(files["metrics"], _printable(doc))
    out["metrics"] = files["metrics"]
    return out


def _printable(obj):
    """Every string (keys included) valid UTF-8, so strict JSON readers accept the file whatever the names were."""
    if isinstance(obj, str):
        return safe_str(obj)
    if isinstance(obj, Mapping):
        return {_printable(k) if isinstance(k, str) else k: _printable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_printable(v) for v in obj]
    return obj


def save_reliability_png(before: dict, after: dict, path, title: str = "") -> Path:
    """Reliability diagram: accuracy against confidence per bin, before and after calibration, with the diagonal.

    ``before`` / ``after``: ``{"ece": float, "bins": [{"confidence", "accuracy", "n"}, ...]}`` as
    featx.heads.calibration computes them.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.6), dpi=110)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    for res, name, colour in ((before, "before", "tab:red"), (after, "after", "tab:blue")):
        pts = [(b["confidence"], b["accuracy"], b["n"]) for b in res["bins"] if b["n"]]
        if pts:
            xs, ys, ns = zip(*pts)
            # area ~ images in the bin: a bin of 2 images says little, one of 200 a lot
            sizes = [12 + 180 * n / max(ns) for n in ns]
            ax.plot(xs, ys, color=colour, lw=0.8, alpha=0.5)
            ax.scatter(xs, ys, s=sizes, color=colour, alpha=0.8, label=f"{name} (ECE {res['ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top class probability); point area = images in the bin")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "reliability", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)

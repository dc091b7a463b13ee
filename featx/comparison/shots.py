"""`featx compare --shots`: validation accuracy against images per class, for frozen features, fine-tuning and
scratch CNNs, as one curve (issue 18).

The rule:

- Subsets come from the training split only. For draw ``d`` each class's training images (those that decode) are
  shuffled by a generator seeded with ``(seed, d)`` and the first ``k`` are taken, so one draw's subsets are nested
  (its k=2 holds its k=1) and the curve moves with k, not with the luck of each draw.
- Every run is scored on the split's validation images: the same images for every k, method and draw, never an
  image any subset trained on (``featx.data.split.restrict_train`` refuses a subset outside the training split).
- The smallest k is drawn ``repeats`` times (the heads: every k below all, a refit costs milliseconds); the curve
  gives the mean, standard deviation, min and max over the draws.
- Frozen features: the head kind that scored best on the full training split, refitted on the subset's rows of the
  features extracted once. Below ``CV_MIN_SHOTS`` images per class its parameter is fixed instead of searched
  (:func:`head_params_at`).
- Fine-tuning and scratch: the full run's recipe and number of epochs, each epoch filled with whole copies of the
  subset up to the size of the full training split, so every k takes the same optimizer steps and validation
  passes as the full run and costs about the same time. ``--budget`` skips runs that would not fit, and says so;
  the head refits (seconds in all) run first and are never skipped.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..errors import FeatxError, Interrupted, UsageError
from . import methods as M
from .types import Curve, ShotRun

AUTO_SERIES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)  # "auto": this series below the smallest class
QUICK_MAX_SHOT = 20  # --quick with "auto": up to 20 images per class (each size costs about one full run)
# Below 5 images per class, k-fold CV would fit on 1-3 images per class (and cannot split a class of 1 at all), so
# the head's parameter is fixed there instead of searched (head_params_at).
CV_MIN_SHOTS = 5


@dataclass
class ShotPlan:
    ks: list  # images per class, ascending, each below the largest class's training count ("all" is implicit)
    repeats: int
    notes: list = field(default_factory=list)

    def draws(self, family: str, k: int) -> int:
        return self.repeats if family == "heads" or k == self.ks[0] else 1


def parse_shots(value) -> Optional[list]:
    """``"auto"`` -> None; ``"1,2,5,all"`` (or a list) -> [1, 2, 5]: sorted, unique, "all" implied."""
    tokens = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    tokens = [t.strip().lower() for t in tokens if t.strip()]
    if tokens in (["auto"], ["default"]):
        return None
    ks = set()
    for t in tokens:
        if t == "all":
            continue
        if not t.isdigit() or int(t) < 1:
            raise UsageError(f"--shots takes images per class such as 1,2,5,10,all (or auto), got {t!r}")
        ks.add(int(t))
    if not ks:
        raise UsageError("--shots needs at least one number of images per class besides all, e.g. 1,2,5,10,all")
    return sorted(ks)


def plan(s, split) -> ShotPlan:
    """The sizes to run, checked against the training split's class counts before any work."""
    counts = Counter(str(r.label) for r in split.train)
    smallest, largest = min(counts.values()), max(counts.values())
    ks = parse_shots(s.shots)
    notes = []
    if ks is None:
        cap = QUICK_MAX_SHOT if s.quick else float("inf")
        ks = [k for k in AUTO_SERIES if k < smallest and k <= cap]
    else:
        same = [k for k in ks if k >= largest]
        if same:
            notes.append(f"{', '.join(map(str, same))} image(s) per class: no class has more than {largest} training "
                         "images, so that is the whole training split (the 'all' point)")
        ks = [k for k in ks if k < largest]
        if ks and ks[-1] > smallest:
            few = sorted(c for c, n in counts.items() if n < ks[-1])
            notes.append(f"class(es) {', '.join(few)} have fewer training images than some sizes (the smallest "
                         f"{smallest}); at those sizes they give all of theirs")
    if not ks:
        raise UsageError(f"--shots leaves no size below the whole training split (its smallest class has {smallest} "
                         "training images); give smaller sizes such as 1,2,5")
    return ShotPlan(ks=ks, repeats=int(s.repeats), notes=notes)


def draw(pool: dict, k: int, d: int, seed: int) -> list:
    """Relative paths of k training images per class (all of a class's when it has fewer), draw ``d``."""
    rng = np.random.default_rng([abs(int(seed)), int(d)])
    out = []
    for c in sorted(pool):
        order = rng.permutation(len(pool[c]))  # does not depend on k: the draws are nested
        out += [pool[c][i] for i in order[:k]]
    return out


def head_params_at(kind: str, k: int, cv: int) -> dict:
    """fit_head keywords at k images per class: from CV_MIN_SHOTS up its usual CV search (at most k folds); below,
    no CV: the kind's default parameter (logistic and svm-rbf C=1, linear SVM C=0.01, ridge alpha=1, on
    standardised features) and, for k-NN, the largest odd number of neighbours not above k (1 or 3)."""
    if k >= CV_MIN_SHOTS:
        return {"cv": min(cv, k)}
    if kind == "knn":
        return {"cv": 0, "k": k if k % 2 else k - 1}
    return {"cv": 0}


@dataclass
class _Method:
    method: str
    family: str
    fit: Callable  # (ctx, subset, k, draw) -> (accuracy, balanced accuracy, artifact)


def run(ctx: "M.Context", shot_plan: ShotPlan, rows: list) -> Curve:
    """Every method at every size (the full-data point is the main table's run); -> the curve."""
    pool = _pool(ctx)
    curve = Curve(ks=shot_plan.ks, repeats=shot_plan.repeats, n_classes=len(pool), n_train=len(ctx.split.train),
                  val_images=[str(r.relpath) for r in ctx.split.val], notes=list(shot_plan.notes))
    by = {r.method: r for r in rows}
    ms = _methods(ctx, by, curve)
    for m in ms:
        r = by[m.method]
        curve.runs.append(ShotRun(m.method, m.family, None, 0, len(ctx.split.train), r.accuracy,
                                  r.balanced_accuracy, r.seconds, artifact=r.artifact))
    _announce(ctx, ms, shot_plan)
    # The head refits first, every size and draw: they cost seconds in all, so no fine-tuning run may use up the
    # time they need (the budget never skips them). Then fine-tuning and scratch, small sizes first: a --budget that
    # runs out leaves the cheap end of every curve.
    for group in ([m for m in ms if m.family == "heads"], [m for m in ms if m.family != "heads"]):
        for k in shot_plan.ks:
            for m in group:
                for d in range(shot_plan.draws(m.family, k)):
                    curve.runs.append(_one(ctx, m, draw(pool, k, d, ctx.s.seed), k, d, shot_plan.draws(m.family, k)))
    ctx.log(ran_line(curve))
    curve.sentence = sentence(curve.points(), curve.n_train, curve.n_classes)
    return curve


def ran_line(curve: Curve) -> str:
    """What the curve's runs were, counted after the fact: planned, ran, skipped by --budget, failed per method."""
    parts = []
    for method in curve.labels:
        rs = [r for r in curve.runs if r.method == method and r.k is not None]
        ok = sum(r.accuracy is not None for r in rs)
        skipped = sum(r.skipped is not None for r in rs)
        failed = len(rs) - ok - skipped
        noun = "refits" if method.startswith("heads:") else "runs"
        extra = [f"{skipped} skipped by --budget"] * bool(skipped) + [f"{failed} failed"] * bool(failed)
        parts.append(f"{method} {ok} of {len(rs)} {noun}" + (f" ({', '.join(extra)})" if extra else ""))
    return "learning curve done: " + ("; ".join(parts) if parts else "no method to draw")


def _announce(ctx, ms: list, shot_plan: ShotPlan) -> None:
    """Say up front what the curve will cost: a fine-tuning or scratch run per size costs about its full run."""
    parts, total = [], 0.0
    up_to = "" if ctx.s.budget is None else "up to "  # a plan, not a count: ran_line() says afterwards what ran
    for m in ms:
        n = sum(shot_plan.draws(m.family, k) for k in shot_plan.ks)
        each = ctx.budget.last.get(m.method)
        if m.family == "heads":
            parts.append(f"{m.method} {n} refits")
            continue
        if not each:
            parts.append(f"{m.method} {up_to}{n} runs")
            continue
        total += n * each
        parts.append(f"{m.method} {up_to}{n} x ~{each:.0f} s")
    ctx.log(f"learning curve at {', '.join(map(str, shot_plan.ks))} and all images per class: {'; '.join(parts)}"
            + (f"; {up_to}about {total / 60:.0f} min" if total else "")
            + ("" if ctx.s.budget is None else f" (--budget {ctx.s.budget:g} s skips the fine-tuning and scratch "
                                                 "runs that do not fit; never the head refits, which run first)"))


def _pool(ctx) -> dict:
    """Class -> sorted relative paths of the training images a subset may use (those that decoded, when known)."""
    pool: dict = {}
    for r in ctx.split.train:
        p = str(r.relpath)
        if ctx.features is None or p in ctx.row_of:
            pool.setdefault(str(r.label), []).append(p)
    return {c: sorted(ps) for c, ps in pool.items()}


def _methods(ctx, by: dict, curve: Curve) -> list:
    """The curve's methods: the best head kind, fine-tuning, each scratch CNN, when their full run worked."""
    s = ctx.s
    wanted = []
    if not s.skip_heads:
        wanted.append((f"heads:{ctx.best_head}", "heads", f"frozen features ({ctx.best_head} head)", _head_at))
    if not s.skip_finetune:
        name = M.safe_name(s.backbone)
        wanted.append((f"finetune:{s.backbone}", "finetune", f"fine-tuning ({s.backbone})",
                       lambda c, sub, k, d: _trained(M.finetune_run(c, sub, name=f"{name}-k{k}-d{d + 1}"))))
    for arch in () if s.skip_scratch else s.archs:
        wanted.append((f"scratch:{arch}", "scratch", f"scratch {arch}",
                       lambda c, sub, k, d, a=arch: _trained(M.scratch_run(c, a, sub, name=f"{a}-k{k}-d{d + 1}"))))
    out = []
    for method, family, label, fit in wanted:
        if method in by and by[method].ok:
            curve.labels[method] = label
            out.append(_Method(method, family, fit))
        else:
            curve.notes.append(f"{method.split(':')[0] if family == 'heads' else method}: not on the curve "
                               "(its run on the whole training split failed or was skipped)")
    return out


def _one(ctx, m: _Method, subset: list, k: int, d: int, n_draws: int) -> ShotRun:
    what = f"{m.method} at {k} image(s) per class" + (f" (draw {d + 1} of {n_draws})" if n_draws > 1 else "")
    run_ = ShotRun(m.method, m.family, k, d, len(subset), train_images=subset)
    if m.family != "heads" and not ctx.budget.allows(m.method, what):  # head refits: see run()
        run_.skipped = "budget"
        return run_
    if m.family != "heads":
        ctx.log(f"{what}: {len(subset)} training images")
    t0, c0 = time.perf_counter(), M._clock()
    try:
        run_.accuracy, run_.balanced_accuracy, run_.artifact = m.fit(ctx, subset, k, d)
    except Interrupted:
        raise
    except FeatxError as exc:  # one failed size leaves a gap in the curve, not a failed comparison
        run_.error = str(exc)
        ctx.log(f"warning: {what} failed: {exc}")
    run_.seconds = round(time.perf_counter() - t0, 2)
    ctx.budget.spent(m.method, M._clock() - c0)  # on the budget's own clock (the same one, unless a test sets it)
    return run_


def _head_at(ctx, subset: list, k: int, d: int) -> tuple:
    from ..heads import fit_head

    fs = ctx.features
    rows = np.array([ctx.row_of[p] for p in subset], dtype=np.int64)
    heads_log = logging.getLogger("featx.heads")
    level = heads_log.level
    heads_log.setLevel(logging.ERROR)  # "best C at the edge of the grid" for every draw of a few images: noise here
    try:
        r = fit_head(fs.subset(rows), head=ctx.best_head, val=fs.subset(ctx.val_rows), seed=ctx.s.seed,
                     device=ctx.s.device, **head_params_at(ctx.best_head, k, ctx.cv))
    finally:
        heads_log.setLevel(level)
    val = r.scores["val"]
    return M._num(val.get("accuracy")), M._num(val.get("balanced_accuracy")), None


def _trained(r) -> tuple:
    return r.accuracy, r.balanced_accuracy, r.artifact


# -- the sentence read off the curve --------------------------------------------------------------------------
def sentence(points: list, n_train: int, n_classes: int) -> str:
    """One plain sentence from the numbers: how few images per class the transfer methods need to reach what the
    best scratch CNN reaches with all of them (without a scratch CNN: to come within 0.02 of their own best)."""
    curves: dict = {}
    for p in points:
        c = curves.setdefault(p["method"], {"family": p["family"], "label": p["label"], "k": {}, "all": None})
        if p["k"] is None:
            c["all"] = p["mean"]
        else:
            c["k"][p["k"]] = p["mean"]
    if not any(c["k"] for c in curves.values()):
        return ""  # nothing but the full-data points (the budget skipped every smaller run): nothing to read off
    pc = f"{n_train / max(1, n_classes):.0f}"
    scratch = [c for c in curves.values() if c["family"] == "scratch" and c["all"] is not None]
    transfer = [c for c in curves.values() if c["family"] != "scratch"]
    done = [c for c in transfer if c["all"] is not None]
    if scratch:
        s = max(scratch, key=lambda c: c["all"])
        arch = s["label"].removeprefix("scratch ")
        hit = _first_reaching(transfer, s["all"])
        if hit:
            k, c = hit
            return (f"With {_images(k)} per class, {c['label']} {_reach(c)} {c['k'][k]:.2f}; the best scratch CNN "
                    f"({arch}) needs all {pc} per class ({n_train} training images) to reach {s['all']:.2f}.")
        if done:
            c = max(done, key=lambda c: c["all"])
            return (f"Even with all {pc} images per class, {c['label']} {_reach(c)} only {c['all']:.2f}, below "
                    f"the {s['all']:.2f} of the best scratch CNN ({arch}).")
        k0 = min(s["k"], default=None)
        first = f"{s['k'][k0]:.2f} with {_images(k0)} per class and " if k0 else ""
        return f"The best scratch CNN ({arch}) reaches {first}{s['all']:.2f} with all {pc} per class."
    if not done:
        return ""
    c = max(done, key=lambda c: c["all"])
    hit = _first_reaching([c], c["all"] - 0.02)
    if hit:
        k = hit[0]
        return (f"With {_images(k)} per class, {c['label']} {_reach(c)} {c['k'][k]:.2f}, within 0.02 of the "
                f"{c['all']:.2f} {'they reach' if c['family'] == 'heads' else 'it reaches'} with all {pc}.")
    return f"{c['label'][0].upper()}{c['label'][1:]} {_reach(c, need=True)} all {pc} images per class to reach {c['all']:.2f}."


def _first_reaching(curves: list, target: float):
    """(smallest k, curve) at which a curve's mean reaches ``target``; ties on k go to the higher accuracy."""
    hits = [(k, -c["k"][k], i) for i, c in enumerate(curves) for k in sorted(c["k"]) if c["k"][k] >= target - 1e-9]
    if not hits:
        return None
    k, _, i = min(hits)
    return k, curves[i]


def _images(k: int) -> str:
    return f"{k} image" + ("" if k == 1 else "s")


def _reach(c: dict, need: bool = False) -> str:
    plural = c["family"] == "heads"  # "frozen features reach", "fine-tuning reaches"
    if need:
        return "need" if plural else "needs"
    return "reach" if plural else "reaches"

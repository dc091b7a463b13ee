"""Issue 24 item 8: `compare --shots --budget` runs the head refits first and never skips them for fine-tuning; the
draw counts it prints are those that ran; the learning curve breaks at sizes that did not run."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import featx.comparison.methods as methods
import featx.comparison.shots as shots
from featx.comparison.types import CompareSettings, Curve, MethodResult, ShotRun


def _ctx(tmp_path, budget_s: float, now: list, logs: list):
    """A comparison's context after its main table: 4 training images per class, 2 validation images, no features
    (every training image may be drawn); the budget's clock is ``now[0]``."""
    rec = lambda p, c: SimpleNamespace(relpath=Path(p), label=c)  # noqa: E731
    train = [rec(f"{c}/{i}.png", c) for c in ("a", "b") for i in range(4)]
    split = SimpleNamespace(train=train, val=[rec("a/v.png", "a"), rec("b/v.png", "b")])
    s = CompareSettings(backbone="x", archs=(), skip_scratch=True, budget=budget_s, repeats=3)
    budget = methods.Budget(budget_s, t0=0.0)
    return methods.Context(s=s, images=tmp_path, split=split, run_dir=tmp_path, log=logs.append, on_epoch=None,
                           budget=budget, best_head="logistic")


def _rows():
    return [MethodResult("heads:logistic", 0.9, 0.9, 1.0, 10, "heads"),
            MethodResult("finetune:x", 0.95, 0.95, 100.0, 1000, "finetune")]


def test_head_refits_run_first_and_fine_tuning_never_uses_up_their_time(tmp_path, monkeypatch):
    now, logs, order = [0.0], [], []
    monkeypatch.setattr(methods, "_clock", lambda: now[0])

    def head_at(ctx, subset, k, d):
        order.append(("heads", k, d))
        now[0] += 1.0  # a refit: one second
        return 0.8, 0.8, None

    def finetune_run(ctx, subset=None, name=None):
        order.append(("finetune", len(subset) // 2, name))
        now[0] += 140.0  # a fine-tuning run: longer than the budget has left after it
        return MethodResult("finetune:x", 0.7, 0.7, 140.0, 1000, "finetune", artifact=name)

    monkeypatch.setattr(shots, "_head_at", head_at)
    monkeypatch.setattr(methods, "finetune_run", finetune_run)
    ctx = _ctx(tmp_path, 300.0, now, logs)
    ctx.budget.spent("finetune:x", 100.0)  # the main table's fine-tuning run
    now[0] = 150.0  # the main table took half the budget
    plan = shots.ShotPlan(ks=[1, 2], repeats=3)
    curve = shots.run(ctx, plan, _rows())

    heads = [r for r in curve.runs if r.family == "heads" and r.k is not None]
    assert len(heads) == 6 and all(r.accuracy == 0.8 and r.skipped is None for r in heads)
    first_ft = next(i for i, o in enumerate(order) if o[0] == "finetune")
    assert all(o[0] == "heads" for o in order[:first_ft]) and len(order[:first_ft]) == 6  # every refit first
    ft = [r for r in curve.runs if r.family == "finetune" and r.k is not None]
    assert [r.skipped for r in ft] == [None, "budget", "budget", "budget"]  # 1 run at k=1, then the budget is spent
    assert any(n.startswith("skipped finetune:x at 2 image(s) per class") for n in ctx.budget.notes)
    # the counts printed after the curve are those that ran, not the plan
    assert logs[-1] == ("learning curve done: heads:logistic 6 of 6 refits; "
                        "finetune:x 1 of 4 runs (3 skipped by --budget)")
    assert "finetune:x up to 4 x ~100 s" in logs[0] and "never the head refits" in logs[0]


def test_the_curve_table_title_counts_the_draws_that_ran():
    from featx.cli.compare import _curve_table
    from featx.comparison.render import draws_title

    curve = Curve(ks=[1, 2], repeats=3, n_classes=2, n_train=8, val_images=["a/v.png", "b/v.png"],
                  labels={"finetune:x": "fine-tuning (x)"})
    curve.runs = [ShotRun("finetune:x", "finetune", None, 0, 8, 0.9),
                  ShotRun("finetune:x", "finetune", 1, 0, 2, 0.6),
                  ShotRun("finetune:x", "finetune", 1, 1, 2, skipped="budget"),
                  ShotRun("finetune:x", "finetune", 1, 2, 2, skipped="budget"),
                  ShotRun("finetune:x", "finetune", 2, 0, 4, 0.7)]
    assert "3 draws" not in _curve_table(curve).title  # --repeats 3 asked, one draw ran
    assert draws_title(curve.points()) == ("one draw per size", False)
    curve.runs[2] = ShotRun("finetune:x", "finetune", 1, 1, 2, 0.62)
    assert draws_title(curve.points())[0] == "mean±sd over 2 draws where a size has several"
    curve.runs.append(ShotRun("heads:l", "heads", 2, 0, 4, 0.7))
    curve.runs += [ShotRun("heads:l", "heads", 2, d, 4, 0.7) for d in (1, 2)]
    assert draws_title(curve.points()) == ("mean±sd over the draws that ran (n)", True)


def test_the_curve_breaks_at_a_size_that_did_not_run(tmp_path, monkeypatch):
    import matplotlib.axes

    from featx.report import curve_series, save_shots_curve_png

    pts = [{"label": "ft", "k": 1, "images_per_class": 1.0, "mean": 0.5, "min": 0.4, "max": 0.6, "n": 3},
           {"label": "ft", "k": 5, "images_per_class": 5.0, "mean": 0.7, "n": 1},
           {"label": "ft", "k": None, "images_per_class": 20.0, "mean": 0.9, "n": 1}]
    x, y, lo, hi = curve_series(pts, sizes=[1, 2, 5, 20])
    assert list(x) == [1, 2, 5, 20] and math.isnan(y[1]) and math.isnan(lo[1]) and math.isnan(hi[1])
    assert [y[0], lo[0], hi[0], y[2], lo[2], y[3]] == [0.5, 0.4, 0.6, 0.7, 0.7, 0.9]

    drawn = []
    real = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, *a, **kw):
        drawn.append(list(y))
        return real(self, x, y, *a, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    save_shots_curve_png(pts, tmp_path / "c.png", sizes=[1, 2, 5, 20])
    assert len(drawn) == 1 and len(drawn[0]) == 4 and math.isnan(drawn[0][1])  # no line from 1 to 5
    assert (tmp_path / "c.png").stat().st_size > 0


def test_head_refits_run_when_the_main_table_spent_the_budget(tmp_path, monkeypatch):
    now, logs = [0.0], []
    monkeypatch.setattr(methods, "_clock", lambda: now[0])
    monkeypatch.setattr(shots, "_head_at", lambda ctx, subset, k, d: (0.8, 0.8, None))
    ctx = _ctx(tmp_path, 100.0, now, logs)
    ctx.s.skip_finetune = True
    now[0] = 500.0  # fine-tuning in the main table took five times the budget
    curve = shots.run(ctx, shots.ShotPlan(ks=[1, 2], repeats=2), _rows()[:1])
    assert [r.accuracy for r in curve.runs if r.k is not None] == [0.8] * 4

"""The one split rule: same seed -> same held-out images in every command, stable when other images come and go."""
from __future__ import annotations

import numpy as np
import pytest

from featx.data.split import holdout, plan_split
from featx.errors import DataError


def _items(n_per_class=20, classes=("a", "b")):
    rel = [f"{c}/{i:03d}.jpg" for c in classes for i in range(n_per_class)]
    lab = [p.split("/")[0] for p in rel]
    return rel, lab


def test_holdout_is_stratified_seeded_and_disjoint():
    rel, lab = _items()
    tr, va = holdout(rel, lab, 0.25, seed=0)
    assert len(va) == 10 and len(tr) == 30 and not set(tr) & set(va)
    assert sorted(lab[i] for i in va).count("a") == 5
    tr2, va2 = holdout(rel, lab, 0.25, seed=0)
    assert np.array_equal(va, va2)
    _, va3 = holdout(rel, lab, 0.25, seed=1)
    assert not np.array_equal(va, va3)


def test_holdout_keeps_its_images_when_another_image_is_missing():
    """An image that one command could not read must not reshuffle the other images' sides."""
    rel, lab = _items()
    _, va = holdout(rel, lab, 0.2, seed=0)
    held = {rel[i] for i in va}
    dropped = next(p for p in rel if p not in held and p.startswith("a/"))  # a training image goes missing
    rel2 = [p for p in rel if p != dropped]
    _, va2 = holdout(rel2, [p.split("/")[0] for p in rel2], 0.2, seed=0)
    assert {rel2[i] for i in va2} == held


def test_plan_uses_val_folder_and_scores_test_only_at_the_end():
    rel = ["train/a/1", "train/a/2", "train/b/1", "train/b/2", "val/a/1", "val/b/1", "test/a/1", "test/b/1"]
    lab = [p.split("/")[1] for p in rel]
    sp = [p.split("/")[0] for p in rel]
    plan = plan_split(rel, lab, sp)
    assert plan.sizes() == {"train": 4, "val": 2, "test": 2} and "'val'" in plan.how


def test_plan_without_val_holds_out_train_never_test():
    rel = [f"train/{c}/{i}" for c in "ab" for i in range(10)] + ["test/a/1", "test/b/1"]
    lab = [p.split("/")[1] for p in rel]
    sp = [p.split("/")[0] for p in rel]
    plan = plan_split(rel, lab, sp, val_fraction=0.2, seed=0)
    assert all(sp[i] == "train" for i in plan.val) and len(plan.val) == 4
    assert [sp[i] for i in plan.test] == ["test", "test"]
    assert "hold-out of 'train'" in plan.how


def test_plan_flat_folder_and_unlabelled_rows():
    rel, lab = _items(5)
    lab = lab[:-1] + [""]
    plan = plan_split(rel, lab, None, val_fraction=0.2)
    assert len(plan.ignored) == 1 and len(plan.train) + len(plan.val) == 9 and len(plan.test) == 0


def test_plan_refuses_one_class():
    with pytest.raises(DataError, match="at least two"):
        plan_split(["a/1", "a/2"], ["a", "a"], None, val_fraction=0.5)

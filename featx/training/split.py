"""Which images of a folder train, select the best epoch (validation) and are scored once at the end (test).

finetune and scratch follow the one rule of :func:`featx.data.split.plan_split`, on the same relative paths as
``featx fit``, so for a seed they hold out the same images: the folder's val/ selects; without one, a stratified
seeded hold-out of train/ does; test/ is never used to select, only scored with the best weights at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..data.split import plan_split


@dataclass
class TrainSplit:
    train: list  # ImageRecord
    val: list
    test: list
    classes: list  # the folder's classes that have images in any of the three
    how: str  # how validation was chosen, one line for reports
    warnings: list = field(default_factory=list)


def split_folder(folder, val_split: float, seed: int) -> TrainSplit:
    """An :class:`~featx.data.discover.ImageFolder` -> train / val / test records (see the module docstring)."""
    recs = folder.records
    plan = plan_split([r.relpath for r in recs], [r.label for r in recs],
                      folder.splits() if folder.has_splits else None, val_fraction=val_split, seed=seed)
    warnings = list(plan.warnings)
    unlabelled = sum(1 for i in plan.ignored if recs[i].label is None)
    if unlabelled:
        warnings.append(f"{unlabelled} image(s) without a class folder were ignored")
    train, val, test = ([recs[i] for i in idx] for idx in (plan.train, plan.val, plan.test))
    present = {r.label for r in (*train, *val, *test)}
    classes = [c for c in folder.classes if c in present] or sorted(present)
    classes += sorted(present - set(classes))  # a class the folder listing missed still gets an output
    # "folders" when the folder's own val/ selects: the word run folders and compare have always recorded
    how = "folders" if plan.how.startswith("the folder's") else plan.how
    return TrainSplit(train=train, val=val, test=test, classes=classes, how=how, warnings=warnings)

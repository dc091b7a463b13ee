"""The ONE rule for which images train, which select (validation) and which are scored once (test).

Every command that trains something (``fit``, ``finetune``, ``scratch``, ``compare``, ``audit``) calls
:func:`plan_split` on the images' relative paths, labels and folder splits, so the same seed holds out the same
images everywhere:

- a folder's own ``val/`` (or ``valid/``, ``validation/``) split selects; ``test/`` is only scored at the end;
- no val split: a stratified, seeded hold-out of ``train/`` selects (never ``test/``: choosing epochs or C on
  test inflates its score);
- no splits at all: a stratified, seeded hold-out of everything selects.

The hold-out is hash-ordered rather than drawn by ``sklearn.model_selection.train_test_split``. Both are
stratified and seeded, but train_test_split's draw depends on every other item in the list: one unreadable image
(present in a training folder, absent from the features file) reshuffles the whole hold-out, so ``fit`` and
``finetune`` would validate on different images. Ordering each class by a seeded hash of the relative path
keeps every image's side fixed whatever else is in the folder (measured in tests/test_split.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..errors import DataError

VAL_NAMES = ("val", "valid", "validation")  # split names that mean "validation"
TRAIN, TEST = "train", "test"


@dataclass
class SplitPlan:
    """Index arrays (into the lists given to :func:`plan_split`) and how they were chosen."""

    train: np.ndarray
    val: np.ndarray  # selects epochs / hyper-parameters / the best head
    test: np.ndarray  # scored once at the end; never used for selection
    how: str  # one line for reports: "the folder's 'val' split", "a stratified 20% hold-out of 'train' (seed 0)"
    ignored: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # unlabelled / unknown split
    warnings: list = field(default_factory=list)

    def sizes(self) -> dict:
        return {"train": int(len(self.train)), "val": int(len(self.val)), "test": int(len(self.test))}


def _rank(relpath: str, seed: int) -> bytes:
    return hashlib.blake2b(f"{seed}\0{relpath}".encode("utf-8", "surrogateescape"), digest_size=8).digest()


def holdout(relpaths: Sequence[str], labels: Sequence, fraction: float, seed: int = 0) -> tuple:
    """Stratified, seeded hold-out: -> (train_idx, val_idx), both sorted.

    Per class, items are ordered by a seeded hash of their relative path and the first ``round(n * fraction)``
    are held out: at least one per class with two or more items, and always at least one left to train on.
    """
    if not 0 < fraction < 1:
        raise DataError(f"the validation fraction must be between 0 and 1, not {fraction}")
    by_class: dict = {}
    for i, (p, y) in enumerate(zip(relpaths, labels)):
        by_class.setdefault(y, []).append(i)
    val: list = []
    for y, idx in by_class.items():
        idx = sorted(idx, key=lambda i: _rank(str(relpaths[i]), seed))
        n = len(idx)
        k = min(n - 1, max(1 if n >= 2 else 0, int(round(n * fraction))))
        val += idx[:k]
    val_set = set(val)
    train = np.array([i for i in range(len(relpaths)) if i not in val_set], dtype=np.int64)
    return train, np.array(sorted(val), dtype=np.int64)


def plan_split(relpaths: Sequence[str], labels: Sequence, splits: Optional[Sequence[str]] = None, *,
               val_fraction: float = 0.2, seed: int = 0, has_val: Optional[bool] = None) -> SplitPlan:
    """Decide train / val / test rows for a labelled collection (see the module docstring for the rule).

    Args:
        relpaths: one relative path per item (the hold-out is keyed on it).
        labels: class names; ``None`` or ``""`` marks an unlabelled item (ignored).
        splits: folder split per item (``train``, ``val``, ``test`` ...), or None for a flat folder.
        val_fraction: hold-out fraction when there is no val split; 0 means "no validation".
        has_val: pass False when validation comes from elsewhere (``fit --val OTHER``): nothing is held out.
    """
    n = len(relpaths)
    lab = np.array([bool(y) for y in labels], dtype=bool) if n else np.zeros(0, bool)
    warnings: list = []
    if not lab.any():
        raise DataError("no labelled images: give one sub-folder per class (or train/ and val/ folders with class "
                        "sub-folders inside)")
    if splits is None:
        pool = np.flatnonzero(lab)
        ignored = np.flatnonzero(~lab)
        test = np.zeros(0, dtype=np.int64)
        val_from_folder = None
        scope = ""
    else:
        sp = np.array([str(s) for s in splits], dtype=object)
        names = set(sp[lab].tolist())
        if TRAIN not in names:
            raise DataError(f"the images carry splits ({', '.join(sorted(names))}) but no 'train' split to train on")
        unknown = sorted(names - {TRAIN, TEST, *VAL_NAMES})
        if unknown:
            warnings.append(f"ignoring images of unknown split(s): {', '.join(unknown)}")
        val_name = next((v for v in VAL_NAMES if v in names), None)
        pool = np.flatnonzero(lab & (sp == TRAIN))
        test = np.flatnonzero(lab & (sp == TEST))
        val_from_folder = np.flatnonzero(lab & (sp == val_name)) if val_name and has_val is not False else None
        keep = (sp == TRAIN) | (sp == TEST) | ((sp == val_name) if val_name else False)
        ignored = np.flatnonzero(~(lab & keep))
        scope = " of 'train'"
        if val_name and has_val is not False:
            how = f"the folder's {val_name!r} split"
    if has_val is False:
        train, val, how = pool, np.zeros(0, dtype=np.int64), "validation given separately"
    elif val_from_folder is not None:
        train, val = pool, val_from_folder
    elif val_fraction and val_fraction > 0:
        rel = [relpaths[i] for i in pool]
        tr, va = holdout(rel, [labels[i] for i in pool], float(val_fraction), seed)
        train, val = pool[tr], pool[va]
        how = f"a stratified {val_fraction:.0%} hold-out{scope} (seed {seed})"
    else:
        train, val, how = pool, np.zeros(0, dtype=np.int64), "no validation (validation fraction 0)"
    classes = {labels[i] for i in train}
    if len(classes) < 2:
        raise DataError(f"the training images hold {len(classes)} class(es); a classifier needs at least two")
    for name, idx in (("validation", val), ("test", test)):
        unseen = sorted({labels[i] for i in idx} - classes)
        if unseen:
            warnings.append(f"{name} images of class(es) {', '.join(map(str, unseen))} have no training images; "
                            "they always count as errors")
    return SplitPlan(train=np.sort(train), val=np.sort(val), test=np.sort(test), how=how,
                     ignored=np.sort(ignored), warnings=warnings)


# -- the same rule over discovered image records (finetune, scratch, compare) -----------------------------------
@dataclass
class Split:
    """Image records per role. ``test`` is scored once at the end, never used to pick an epoch or a head."""

    train: list  # ImageRecord
    val: list
    classes: list
    source: str  # "folders" (the folder's val/ split) or plan_split's ``how`` ("a stratified 20% hold-out ...")
    warnings: list = field(default_factory=list)
    test: list = field(default_factory=list)


def split_records(folder, val_fraction: float, seed: int = 0) -> Split:
    """:func:`plan_split` applied to an ``ImageFolder``'s records (``featx.data.discover``)."""
    records = list(folder.records)
    labelled = [r for r in records if r.label is not None]
    if not labelled:
        raise DataError(f"no labelled images in {folder.root}: training needs one sub-folder per class "
                        "(or train/ and val/ folders with class sub-folders inside)")
    found = {r.label for r in labelled}
    if len(found) < 2:
        raise DataError(f"training needs at least 2 classes, found {len(found)} in {folder.root}")
    splits = [r.split or "" for r in records] if getattr(folder, "has_splits", False) else None
    plan = plan_split([r.relpath for r in records], [r.label or "" for r in records], splits,
                      val_fraction=val_fraction, seed=seed)
    warnings = list(plan.warnings)
    if len(labelled) < len(records):
        warnings.insert(0, f"{len(records) - len(labelled)} image(s) without a class folder were ignored")
    train, val, test = ([records[i] for i in idx] for idx in (plan.train, plan.val, plan.test))
    used = {r.label for r in (*train, *val, *test)}  # a test-only class still gets an output (always an error)
    classes = [c for c in (getattr(folder, "classes", None) or sorted(used)) if c in used]
    classes += sorted(used - set(classes))  # a class the folder listing missed
    source = "folders" if plan.how.startswith("the folder's") else plan.how
    return Split(train=train, val=val, classes=classes, source=source, warnings=warnings, test=test)


def restrict_train(split: Split, relpaths: Sequence[str], fill_to: Optional[int] = None) -> Split:
    """``split`` training on ``relpaths`` only (``featx compare --shots``); validation and test stay as they are.

    Every path must be one of the split's training images, so a subset can never reach into validation or test.
    ``fill_to``: repeat the subset (whole copies, so the classes keep their balance) until an epoch holds at least
    that many images; a few-shot run then takes as many optimizer steps per epoch as the full run.
    """
    by_rel = {str(r.relpath): r for r in split.train}
    chosen = list(dict.fromkeys(str(p) for p in relpaths))
    outside = [p for p in chosen if p not in by_rel]
    if outside:
        raise DataError(f"{len(outside)} image(s) to train on are not training images of this split "
                        f"(e.g. {outside[0]}); a training subset must come from the training split")
    if not chosen:
        raise DataError("the training subset is empty")
    train = [by_rel[p] for p in chosen]
    repeat = max(1, math.ceil(fill_to / len(train))) if fill_to else 1
    return dataclasses.replace(split, train=train * repeat)

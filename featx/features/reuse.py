"""An existing store at the output: "already complete" (same request, same files: nothing to run) or another source.

Why: re-running an identical `featx extract` should cost a directory listing, not a network build and a pass over
every image; and a store made from another folder or another backbone must not be replaced by accident (the user
asked for a new output, or forgot `-o`), so that needs `--overwrite`.

What "identical" means here, decided before any network is built:
- the request: the backbone as named, pretrained or not, the --weights file (path, size, mtime), the layer, the
  --image-size request (a number, auto, or none), the pixel limit and featx's version: the options that decide the
  provenance (`store.PROVENANCE_KEYS`) once the network is built;
- the files: every discovered image's relative path, size and modification time (the same listing a resumable
  job checks, `engine._plan_chunks`), so an added, removed, edited or touched image means a new extraction.
Both are stored in the store's meta (``request``, ``files``); a store without them (older featx) is re-extracted.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .._io import fingerprint, safe_str
from ..errors import UsageError
from .store import FORMAT, provenance_fingerprint, read_meta


def _stat(path) -> tuple:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def request_key(backbone, *, pretrained: bool, weights, layer: Optional[str], image_size, max_pixels) -> Optional[str]:
    """Fingerprint of what was asked for, or None when it cannot be known without building (a ready `Backbone`)."""
    from .. import __version__

    if not isinstance(backbone, str):
        return None
    w = None
    if weights is not None:
        p = Path(weights).resolve()
        w = [str(p), *_stat(p)]
    return fingerprint({"backbone": backbone.strip(), "pretrained": bool(pretrained) if weights is None else None,
                        "weights": w, "layer": layer or "pooled", "image_size": image_size, "max_pixels": max_pixels,
                        "featx": __version__})


def files_key(folder) -> str:
    """Fingerprint of the discovered listing: relative paths, sizes, modification times, and what was skipped."""
    return fingerprint({"files": [(r.relpath, *_stat(r.path)) for r in folder.records],
                        "skipped": sorted(str(s.get("path")) for s in folder.skipped)})


def existing_store(output: Path, fmt: str = "npz") -> Optional[dict]:
    """The meta of the finished featx store at `output`, or None (none there, or not one featx can read back: an
    unfinished sharded folder resumes through its workers' chunks, `featx.features.sharded`)."""
    if fmt == "sharded":
        from ..errors import FeatxError
        from .sharded import MANIFEST, read_manifest

        if not (Path(output) / MANIFEST).is_file():
            return None
        try:
            meta = read_manifest(output)["meta"]
        except FeatxError:  # damaged: nothing to reuse; check_folder still guards what is not ours
            return None
        return meta if isinstance(meta, dict) else None
    if not Path(output).is_file():
        return None
    if fmt == "npz":
        meta = read_meta(output)  # the meta member only
    elif fmt == "parquet":
        from .formats import reader

        try:
            meta = reader(fmt)(output).meta
        except Exception:  # unreadable, not ours, pyarrow missing: nothing to reuse or protect here
            return None
    else:
        return None
    if not isinstance(meta, dict) or (fmt == "npz" and meta.get("format") != FORMAT):
        return None
    return meta


def is_complete(meta: Optional[dict], root: Path, request: Optional[str], files: str) -> bool:
    """The store already holds this very extraction (same folder, request and listing)."""
    return bool(meta) and request is not None and meta.get("request") == request and meta.get("files") == files \
        and meta.get("root") == str(Path(root).resolve())


def refuse_other_folder(meta: Optional[dict], output: Path, root: Path, backbone) -> None:
    """UsageError when the store at `output` was made from another image folder (checked before any network)."""
    if not meta or not meta.get("root"):
        return
    new_root = str(Path(root).resolve())
    if meta["root"] != new_root:
        name = backbone if isinstance(backbone, str) else getattr(backbone, "name", "?")
        raise UsageError(
            f"{safe_str(str(output))} holds features of another folder: {safe_str(meta['root'])} "
            f"({meta.get('backbone')}); this run: {safe_str(new_root)} ({name}). Pass --overwrite to replace it, "
            "or choose another -o")


def refuse_other_backbone(meta: Optional[dict], output: Path, new_meta: dict) -> None:
    """UsageError when the store at `output` was made with another backbone, weights, layer or crop size."""
    if not meta or provenance_fingerprint(meta) == provenance_fingerprint(new_meta):
        return
    raise UsageError(
        f"{safe_str(str(output))} holds features of another backbone: {describe(meta)}; this run: "
        f"{describe(new_meta)}. Pass --overwrite to replace it, or choose another -o")


def describe(meta: dict) -> str:
    """'efficientnet_lite0 (weights 1a2b3c4d5e6f, layer pooled, 256 px)'."""
    sha = str(meta.get("weights_sha256") or "?")
    size = (meta.get("preprocess") or {}).get("input_size", "?")
    return f"{meta.get('backbone')} (weights {sha[:12]}, layer {meta.get('layer')}, {size} px)"

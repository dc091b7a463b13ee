"""Small file-system helpers shared by every writer: atomic replace, hashing, JSON that never fails on odd paths."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from .errors import ArtifactError, FeatxError

TMP_MARK = ".featx-tmp-"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write to a temp file beside ``path`` and rename it over ``path`` only when the block succeeds.

    A crash, a signal or a full disk leaves the previous ``path`` untouched; the temp file is removed
    (or, after SIGKILL, swept by :func:`sweep_stale_temps` on the next run).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_MARK + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quiet(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise FeatxError(f"cannot write {path}: {exc.strerror}; the previous file (if any) is unchanged") from exc
        raise
    except BaseException:
        _unlink_quiet(tmp)
        raise


def sweep_stale_temps(directory: str | os.PathLike, name: str) -> None:
    """Remove temp files a killed writer of ``name`` left in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.glob(TMP_MARK + name + ".*"):
        _unlink_quiet(p)


def _unlink_quiet(p) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj) -> str:
    """Short stable hash of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def safe_str(s: str) -> str:
    """A path string that encodes as UTF-8 (undecodable bytes in file names become U+FFFD)."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if _has_surrogates(s) else s


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_write(path, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def read_json(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc


def refuse_inside(output: str | os.PathLike, input_root: str | os.PathLike, what: str = "output") -> None:
    """Refuse an output path that lies inside the input folder (it would be read back as input)."""
    out = Path(output).resolve()
    root = Path(input_root).resolve()
    if out == root or root in out.parents:
        raise FeatxError(f"the {what} path {output} lies inside the input folder {input_root}; choose a path outside it", exit_code=2)

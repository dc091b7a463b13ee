"""File-system rules shared by every writer: atomic replace with normal permissions, one ownership and
writability check for every file featx writes, an OS-level lock per output, hashing, JSON that never fails
on odd paths."""
from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Mapping, Optional, Union

from .errors import ArtifactError, FeatxError, OutputError, UsageError

TMP_MARK = ".featx-tmp-"
LOCK_SUFFIX = ".featx-lock"
# errno values that mean "this output cannot be written" (translated into one line, exit 7)
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def stamp() -> str:
    """The mark every featx-written JSON, PNG and Markdown file carries: ``featx <version>``."""
    from . import __version__

    return f"featx {__version__}"


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide and racy)
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _new_file_mode(path: Path) -> int:
    """The mode a plain ``open(path, "w")`` would leave: the existing file's, else 0666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def output_error(path, exc: OSError) -> OutputError:
    """One line for an OSError met while writing ``path`` (read-only, no permission, disk full...)."""
    return OutputError(f"cannot write {safe_str(str(path))}: {exc.strerror or exc}; the previous file (if any) is unchanged")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write to a temp file beside ``path`` and rename it over ``path`` only when the block succeeds.

    A crash, a signal or a full disk leaves the previous ``path`` untouched; the temp file is removed
    (or, after SIGKILL, swept by :func:`sweep_stale_temps` on the next run). The new file gets the permissions
    a plain ``open()`` would give (the umask applies), not mkstemp's 0600.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_MARK + path.name + ".", dir=path.parent)
        os.fchmod(fd, _new_file_mode(path))
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            _unlink_quiet(tmp)
        if exc.errno in WRITE_ERRNOS:
            raise output_error(path, exc) from exc
        raise
    except BaseException:
        if tmp is not None:
            _unlink_quiet(tmp)
        raise


# ---------------------------------------------------------------------------------------------------------
# Which files featx may replace: its own (recognisable) or absent ones; anything else only with --overwrite.

Recogniser = Callable[[Path], bool]


def _json_is_ours(path: Path) -> bool:
    if path.stat().st_size > 256 << 20:
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and str(doc.get("written_by", "")).startswith("featx")


def _png_is_ours(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and b"tEXtSoftware\x00featx" in head


def _md_is_ours(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.readline(256).startswith(MD_STAMP_PREFIX.encode())
    except OSError:
        return False


MD_STAMP_PREFIX = "<!-- written by featx"


def _html_is_ours(path: Path) -> bool:
    """report.html: featx's stamp comment right after the doctype (featx.report_html writes it)."""
    try:
        with open(path, "rb") as fh:
            return MD_STAMP_PREFIX.encode() in fh.read(256)
    except OSError:
        return False


DEFAULT_RECOGNISERS: dict = {".json": _json_is_ours, ".png": _png_is_ours, ".md": _md_is_ours,
                             ".html": _html_is_ours}


def written_by_featx(path: str | os.PathLike, recognise: Optional[Recogniser] = None) -> bool:
    """True when ``path`` is absent, empty, or a regular file featx wrote (by ``recognise``, else by suffix)."""
    path = Path(path)
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return not path.is_symlink()  # a dangling symlink is not ours to replace
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    if st.st_size == 0:
        return True
    recognise = recognise or DEFAULT_RECOGNISERS.get(path.suffix.lower())
    return bool(recognise and recognise(path))


Outputs = Union[Iterable, Mapping]


def check_outputs(outputs: Outputs, *, overwrite: bool = False,
                  hint: str = "choose another output, or pass --overwrite") -> None:
    """Refuse, before any work, outputs featx must not or cannot write.

    ``outputs``: paths, or a mapping path -> recogniser (``None``: by suffix: featx's JSON, PNG, Markdown).
    Every path must be a file path (not a folder), absent or written by featx (unless ``overwrite``), and its
    folder must be creatable and writable (probed with a real temp file: catches read-only mounts too). ``hint``:
    the way out a refusal names (a command without --overwrite must not suggest it).
    """
    items = outputs.items() if isinstance(outputs, Mapping) else ((p, None) for p in outputs)
    folders = set()
    for raw, recognise in items:
        path = Path(raw)
        shown = safe_str(str(path))
        if path.is_dir():
            raise UsageError(f"{shown} is a folder; featx needs a file path there")
        if not overwrite and not written_by_featx(path, recognise):
            raise UsageError(f"{shown} exists and was not written by featx; refusing to replace it ({hint})")
        folders.add(path.parent)
    for folder in sorted(folders, key=str):
        check_writable_folder(folder)


def check_writable_folder(folder: str | os.PathLike) -> None:
    """The nearest existing ancestor of ``folder`` must be a folder we can create files in."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot create the folder {safe_str(str(folder))}: {safe_str(str(probe))} is a file")
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_MARK + "probe.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise OutputError(f"cannot write to {safe_str(str(probe))}: {exc.strerror or exc}") from exc


# ---------------------------------------------------------------------------------------------------------
# One run per output at a time: an OS-level lock, released by the OS when the process dies (never stale).

def _odd_kind(st: os.stat_result) -> Optional[str]:
    """What makes a file unfit to be one of featx's own files beside the user's (None: a plain file, one name)."""
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    if st.st_nlink > 1:
        return f"a hard link to a file with {st.st_nlink} names"
    return None


def _not_ours(path, what: str, kind: str) -> OutputError:
    return OutputError(f"refusing to use the {what} {safe_str(str(path))}: it is {kind}, and featx never writes "
                       f"through one; remove that entry (featx creates the {what} itself) and run again")


def check_beside(path: str | os.PathLike, what: str) -> None:
    """Refuse, before any work, a path featx will create beside the user's files (lock, journal) when something
    that is not a plain featx file is there: a link, a FIFO, a folder... (absent is fine)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise output_error(path, exc) from exc
    kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else _odd_kind(st)
    if kind:
        raise _not_ours(path, what, kind)


def open_beside(path: str | os.PathLike, flags: int, *, what: str) -> int:
    """``os.open`` for a file featx keeps beside the user's (a lock, a journal): never through a symbolic link
    (O_NOFOLLOW), never hanging on a FIFO (O_NONBLOCK), and only a regular file with one name, so a link planted at
    that name cannot aim featx's writes at another file. Refusals are one OutputError line (exit 7) naming ``path``;
    FileNotFoundError passes through (an absent file opened without O_CREAT)."""
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        check_beside(path, what)  # first, so a device file is never even opened
        fd = os.open(path, flags, 0o666 & ~_umask())
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link (planted between the check and the open)
            raise _not_ours(path, what, "a symbolic link") from None
        if exc.errno == errno.EISDIR:
            raise _not_ours(path, what, "a folder") from None
        if exc.errno == errno.ENXIO:  # a socket, or a FIFO nobody reads
            raise _not_ours(path, what, "not a regular file") from None
        raise OutputError(f"cannot open the {what} {safe_str(str(path))}: {exc.strerror or exc}") from exc
    try:
        kind = _odd_kind(os.fstat(fd))  # the file actually opened, whatever happened to the name meanwhile
        if kind:
            raise _not_ours(path, what, kind)
    except BaseException:
        os.close(fd)
        raise
    return fd


class OutputLock:
    """Exclusive ``flock`` on ``.<name>.featx-lock`` beside ``output`` for the life of a run.

    A second run that wants the same output fails at once, naming the first (pid, command, start time).
    Folders the lock had to create are removed again if the run leaves them empty.
    """

    def __init__(self, output: str | os.PathLike):
        self.output = Path(output)
        self.path = self.output.parent / f".{self.output.name}{LOCK_SUFFIX}"
        self._fd: Optional[int] = None
        self._made: list = []

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def acquire(self) -> None:
        """Take the lock, or raise OutputError naming the lock file; any failure leaves nothing behind (no lock
        file, no folder the lock created), so a full disk or a signal here cannot strand a lock."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock, as before
            return
        self._made = _mkdirs(self.output.parent)
        fd, held = None, False
        try:
            while True:
                fd = open_beside(self.path, os.O_RDWR | os.O_CREAT, what="lock file")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    raise OutputError(f"{safe_str(str(self.output))} is being written by another featx run "
                                      f"({_read_holder(fd)}); wait for it to finish, or write to another "
                                      "output") from None
                try:  # the holder may have unlinked the file between our open and our lock: lock the new one
                    held = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    held = False
                if held:
                    break
                os.close(fd)
                fd = None
            import sys

            info = {"pid": os.getpid(),
                    "command": " ".join(map(os.path.basename, sys.argv[:1])) + " " + " ".join(sys.argv[1:]),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode("utf-8", "replace"))
        except BaseException as exc:
            if fd is not None:
                if held:  # ours (we hold it): remove it, or it would name a run that never started
                    _unlink_quiet(self.path)
                os.close(fd)
            self._remove_made()
            if isinstance(exc, OSError):
                raise OutputError(f"cannot create the lock file {safe_str(str(self.path))} for "
                                  f"{safe_str(str(self.output))}: {exc.strerror or exc}; nothing was written") from exc
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        _unlink_quiet(self.path)  # while still holding it: a waiter then sees a different inode and retries
        os.close(self._fd)
        self._fd = None
        self._remove_made()

    def _remove_made(self) -> None:
        for d in reversed(self._made):
            try:
                d.rmdir()
            except OSError:
                break
        self._made = []


def _mkdirs(folder: Path) -> list:
    """mkdir -p that returns the folders it created (outermost first)."""
    made = []
    probe = folder
    while not probe.exists() and probe.parent != probe:
        made.append(probe)
        probe = probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(folder, exc) from exc
    return list(reversed(made))


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
        return f"pid {info['pid']}: {info.get('command', '?').strip()}, since {info.get('started', '?')}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is starting"


@contextlib.contextmanager
def claim_outputs(outputs: Outputs, *, overwrite: bool = False, lock: Optional[str | os.PathLike] = None):
    """check_outputs(outputs), then hold the OutputLock of ``lock`` (default: the first output) for the block."""
    check_outputs(outputs, overwrite=overwrite)
    if lock is None:
        lock = next(iter(outputs))
    with OutputLock(lock) as held:
        yield held


def write_markdown(path: str | os.PathLike, text: str) -> Path:
    """Markdown report, atomically, with featx's stamp as its first line (an HTML comment: invisible when rendered)."""
    with atomic_write(path, "w") as fh:
        fh.write(f"{MD_STAMP_PREFIX} {stamp().split()[-1]} -->\n")
        fh.write(text)
    return Path(path)


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


# One CSV dialect for every table featx writes (predictions, audit lists, training metrics). RFC 4180 line ends:
# with "\r\n" as the terminator the csv module quotes any field holding a "\r" or a "\n" (it quotes the characters of
# its terminator, so with "\n" alone a name holding "\r" went out bare and split its row for Python's csv and pandas).
# QUOTE_ALL would round-trip too, but it changes every header line that recognises featx's own files.
CSV_LINETERMINATOR = "\r\n"


def csv_writer(fh, fieldnames=None, **kw):
    """``csv.writer`` (``csv.DictWriter`` when ``fieldnames`` is given) in featx's one dialect."""
    if fieldnames is not None:
        return csv.DictWriter(fh, fieldnames=fieldnames, lineterminator=CSV_LINETERMINATOR, **kw)
    return csv.writer(fh, lineterminator=CSV_LINETERMINATOR, **kw)


def csv_bytes(header, rows) -> bytes:
    """A CSV document (UTF-8, whatever the locale): ``header`` then ``rows`` (sequences; None is an empty cell). Every
    cell goes through `safe_str`, so a name that is not valid UTF-8 is written as featx writes it everywhere (U+FFFD
    for each undecodable byte); readers match that form back (featx.heads.exclude)."""
    import io

    buf = io.StringIO(newline="")
    w = csv_writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else safe_str(str(v)) for v in r])
    return buf.getvalue().encode("utf-8")


def write_csv(path: str | os.PathLike, header, rows) -> Path:
    """`csv_bytes` written atomically to ``path``."""
    data = csv_bytes(header, rows)
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def write_json(path: str | os.PathLike, data) -> None:
    """JSON, atomically; a dict gets ``"written_by": "featx <version>"`` first, so featx recognises it later."""
    if isinstance(data, dict) and "written_by" not in data:
        data = {"written_by": stamp(), **data}
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

"""Reading zip members (feature stores, head files) with a cap on the bytes actually inflated, whatever the headers say.

A zip's headers are claims: a 2 MB file may declare an 8-byte member whose deflate stream inflates 2 GiB, and
``ZipFile.read`` inflates the whole stream in one call before it truncates to the declared size and checks the CRC.
Every zip featx reads goes through this module instead:

- :func:`check_directory` judges the central directory alone (nothing inflated): only stored and deflated members
  (bzip2 and lzma inflate a whole block per call, so no read of them can be bounded; featx writes neither), no member
  claiming more compressed bytes than the file holds, and declared sizes in proportion to the file;
- :func:`read_member` streams one member in small reads (each inflates at most ``CHUNK`` bytes; zipfile also stops at
  the declared size and checks the CRC there) and stops with ArtifactError once more than ``cap`` bytes came out;
- :func:`verified_zip` streams every member of an archive that another library (skops) will read by itself, and hands
  back bytes that library can read safely: the same bytes when every member is stored (reading a stored member never
  yields more than the file holds), else a copy rewritten with stored members of the sizes actually read.
"""
from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Optional, Union

from .errors import ArtifactError

CHUNK = 1 << 20  # bytes inflated per read
# A member may declare at most _RATIO bytes per compressed byte once it declares more than _FLOOR: featx writes stored
# members, and np.savez_compressed or a re-zip of real features shrinks them ~2-5x, while a 1 MB file declaring a 1 GiB
# member (ratio 1000) is a bomb. The same bound applies to the sum over all members against the file's size, so that
# many directory entries pointing at one compressed stream (an overlap bomb) cannot multiply it.
_RATIO = 100
_FLOOR = 64 << 20
READABLE_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_METHOD_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}


def _limit(compressed: int) -> int:
    return max(_FLOOR, _RATIO * max(int(compressed), 1))


def check_directory(zf: zipfile.ZipFile, path, what: str, archive_size: Optional[int] = None) -> None:
    """Refuse (ArtifactError) a zip whose central directory is not one featx could have written, before anything
    is inflated: a member compressed with a method that cannot be read in bounded steps, a member claiming more
    compressed bytes than the file holds, or declared sizes out of proportion to the compressed data or the file."""
    if archive_size is None:
        archive_size = _size_of(zf, path)
    total = 0
    for info in zf.infolist():
        name, declared, packed = info.filename, int(info.file_size), int(info.compress_size)
        if info.flag_bits & 0x1:
            raise ArtifactError(f"refusing {path}: its member {name!r} is encrypted, which a {what} featx writes never "
                                f"is; re-create it")
        if info.compress_type not in READABLE_METHODS:
            method = _METHOD_NAMES.get(info.compress_type, f"method {info.compress_type}")
            raise ArtifactError(f"refusing {path}: its member {name!r} is compressed with {method}, which featx does "
                                f"not read (a {what} featx writes is stored or deflated); re-create it")
        if packed > archive_size:
            raise ArtifactError(f"refusing {path}: its member {name!r} claims {packed:,} compressed bytes in a file of "
                                f"{archive_size:,} (a damaged or forged {what}); re-create it")
        if declared > _limit(packed):
            raise ArtifactError(
                f"refusing {path}: its member {name!r} declares {declared:,} bytes from {packed:,} compressed bytes "
                f"(a zip bomb or a damaged file); it is not a {what} featx would write. Re-create it")
        total += declared
    if total > _limit(archive_size):
        raise ArtifactError(f"refusing {path}: its {len(zf.infolist())} members declare {total:,} bytes in all from a "
                            f"file of {archive_size:,} bytes (a zip bomb or a damaged file); it is not a {what} featx "
                            f"would write. Re-create it")


def _size_of(zf: zipfile.ZipFile, path) -> int:
    fp = zf.fp
    try:
        here = fp.tell()
        end = fp.seek(0, io.SEEK_END)
        fp.seek(here)
        return int(end)
    except (AttributeError, OSError, ValueError):
        return Path(path).stat().st_size


def read_member(zf: zipfile.ZipFile, member: Union[str, zipfile.ZipInfo], path, what: str,
                cap: Optional[int] = None) -> bytearray:
    """The bytes of ``member``, inflated ``CHUNK`` at a time; ArtifactError once more than ``cap`` bytes came out
    (default: what :func:`check_directory` allows for its compressed size), or when the member is unreadable (a
    failed CRC, a truncated or corrupt stream). The buffer grows with the bytes actually read, never to a size
    the file declares."""
    info = member if isinstance(member, zipfile.ZipInfo) else zf.getinfo(member)
    if cap is None:
        cap = _limit(info.compress_size)
    out = bytearray()
    try:
        with zf.open(info) as fh:
            while True:
                block = fh.read(CHUNK)
                if not block:
                    break
                out += block
                if len(out) > cap:
                    raise ArtifactError(f"refusing {path}: its member {info.filename!r} inflates past {cap:,} bytes "
                                        f"(a zip bomb or a damaged file); it is not a {what} featx would write. "
                                        f"Re-create it")
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise ArtifactError(f"{path} is not a readable {what}: its member {info.filename!r} is damaged "
                            f"({type(exc).__name__}: {exc}); re-create it") from exc
    return out


def verified_zip(data: bytes, path, what: str, member_cap: Optional[int] = None,
                 check: Optional[Callable[[str, bytearray], None]] = None) -> bytes:
    """``data`` (a whole zip) after every member was read under the caps (and passed ``check(name, bytes)``, which
    raises to refuse it): bytes another library may open with ``ZipFile`` and ``read`` freely. Raises ArtifactError
    for anything :func:`check_directory` or :func:`read_member` refuses, or BadZipFile for bytes that are not a zip."""
    members = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        check_directory(zf, path, what, archive_size=len(data))
        for info in zf.infolist():
            cap = None if member_cap is None else min(member_cap, _limit(info.compress_size))
            members.append((info, read_member(zf, info, path, what, cap=cap)))
            if check is not None:
                check(info.filename, members[-1][1])
    if all(info.compress_type == zipfile.ZIP_STORED for info, _ in members):
        return data  # a stored member yields at most the bytes the file holds, whatever a reader asks for
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for info, body in members:
            zf.writestr(info.filename, bytes(body))
    return out.getvalue()

"""The one home of user errors: every error a user can cause (bad config, data, folder, model path,
template) is an ``RlhfError``. The CLI catches this base once and prints one ``Error:`` line; set
``RLHF_DEBUG=1`` to see the traceback instead."""
from __future__ import annotations

import contextlib
import difflib
import errno
import os
import shutil
from pathlib import Path


class RlhfError(Exception):
    """An error the user can fix; the message says what was wrong, where, and what to do."""


class StageError(RlhfError, RuntimeError):
    """A stage folder that is missing, unfinished, of the wrong kind, or from another base model (rlhf/manifest.py);
    a launch the stages cannot run (rlhf/dist.py)."""


def did_you_mean(word: str, valid, *, n: int = 1, cutoff: float = 0.6, otherwise: str = "") -> str:
    """The hint every "unknown ..." error ends with: ``"; did you mean 'x'?"`` naming the (up to ``n``) entries of
    ``valid`` closest to ``word``, else ``otherwise`` (e.g. ``"; valid keys: a, b"``)."""
    close = difflib.get_close_matches(word, list(valid), n=n, cutoff=cutoff)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else otherwise


class DiskError(RlhfError, OSError):
    """The output folder's disk refuses the write: full, read-only, or not writable by this user."""


_WHY = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up",
        errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
        errno.EPERM: "permission denied"}
_LOW = 1 << 20  # bytes: a folder with less free space than this is full for any stage


def _free(folder: Path) -> int | None:
    for p in [folder, *folder.parents]:  # the nearest folder that exists
        if p.exists():
            return shutil.disk_usage(p).free
    return None


def disk_error(e: BaseException, folder: str | os.PathLike | None = None) -> DiskError | None:
    """One line for a write that failed because of the disk: the errno of an OSError anywhere in the chain, or (a
    full disk often surfaces as a library's own error, e.g. torch's "unexpected pos") ``folder``'s free space."""
    err = e
    while err is not None and not (isinstance(err, OSError) and err.errno in _WHY):
        err = err.__cause__ or err.__context__
    where = Path(folder) if folder else None
    if err is not None:
        why, what = _WHY[err.errno], err.filename or where
    elif where is not None and (free := _free(where)) is not None and free < _LOW:
        why, what = f"no space left on the device ({free // 1024} KiB free; the write failed with: {e})", where
    else:
        return None
    if err is not None and err.errno in (errno.EACCES, errno.EPERM):  # a read as well as a write
        return DiskError(f"{what}: {why}; check its permissions, or choose another output folder")
    todo = "make it writable" if err is not None and err.errno == errno.EROFS else "free space there"
    return DiskError(f"cannot write {what}: {why}; {todo}, or choose another output folder")


@contextlib.contextmanager
def disk_errors(folder: str | os.PathLike):
    """``with disk_errors(cfg.output_dir): run(cfg)``: a write refused by ``folder``'s disk becomes a DiskError."""
    try:
        yield
    except Exception as e:
        if not isinstance(e, RlhfError) and (err := disk_error(e, folder)) is not None:
            raise err from e
        raise

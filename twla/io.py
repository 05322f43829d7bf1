"""Safe writes: output paths checked before any work, files and directories written atomically.

Every write goes to a temporary sibling named ``.twla-tmp-<host>-<pid>-<random>`` and is renamed
over the target only when complete; a directory being replaced is first moved aside to
``.twla-old-<host>-<pid>-<random>``. A process killed mid-write leaves such a sibling behind: the
next write into the same parent removes those whose process (on this host) no longer runs, and
nothing else.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_SCRATCH = re.compile(r"^\.twla-(tmp|old)-([0-9a-f]{8})-(\d+)-")


class OutputPathError(ValueError):
    """An output path whose writing could destroy data the toolkit did not write."""


class DiskFullError(OSError):
    """The disk filled while an output was written (nothing of it was left behind)."""


def _disk_full(err: BaseException) -> bool:
    """Whether ``err`` (an OSError, or a library's error that wraps one, as safetensors' does) says that
    the disk or the user's quota is full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(err) or "Disk quota exceeded" in str(err)


@contextmanager
def _refuse_full_disk(path: str) -> Iterator[None]:
    try:
        yield
    except Exception as err:
        if not _disk_full(err):
            raise
        raise DiskFullError(
            f"the disk filled while {path} was written; nothing was written there (free some space or write elsewhere)",
        ) from err


def _scratch_prefix(kind: str) -> str:
    return f".twla-{kind}-{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_scratch(directory: str) -> list[str]:
    """Remove the temporary siblings that interrupted writes of this host left in ``directory``
    (named by this module, their process gone); returns their paths."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _SCRATCH.match(name)
        if not match or match.group(2) != _HOST or _alive(int(match.group(3))):
            continue
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
        removed.append(path)
    return removed


def check_output_dir(
    path: str,
    what: str,
    is_own: Callable[[str], bool],
    *,
    overwrite: bool = False,
    protect: Sequence[str] = (),
) -> None:
    """Refuse, before any work, a directory to be written as ``what`` (e.g. "packed checkpoint")
    when writing it could lose data: the working directory or one of its parents, a path inside or
    around one of ``protect`` (e.g. the source model), a file, a non-empty directory that
    ``is_own`` does not recognize as written by the toolkit, or one that it does without
    ``overwrite``. A missing path or an empty directory is fine."""
    real = os.path.realpath(path)
    cwd = os.path.realpath(os.getcwd())
    if real == cwd or cwd.startswith(real.rstrip(os.sep) + os.sep):
        raise OutputPathError(f"output {path!r} is the working directory or one of its parents; name a new directory")
    for other in protect:
        source = os.path.realpath(other)
        if real == source or real.startswith(source + os.sep) or source.startswith(real.rstrip(os.sep) + os.sep):
            raise OutputPathError(f"output {path!r} would overwrite the model at {other!r}; name a new directory")
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise OutputPathError(f"output {path!r} exists and is not a directory; name a new directory")
    if not os.listdir(path):
        return
    if not is_own(path):
        raise OutputPathError(
            f"output {path!r} is a non-empty directory that is not a {what} written by twla; "
            "nothing was changed; name a new or empty directory"
        )
    if not overwrite:
        raise OutputPathError(f"output {path!r} already holds a {what}; pass --overwrite to replace it")


def json_format(path: str) -> str | None:
    """The ``"format"`` field of the JSON object in ``path`` (how twla marks the files it writes),
    or None when there is no such readable file or field."""
    try:
        with open(path, encoding="utf-8") as fh:
            content = json.load(fh)
    except (OSError, ValueError):
        return None
    return content.get("format") if isinstance(content, dict) else None


def check_output_file(path: str, fmt: str, *, overwrite: bool = False) -> None:
    """Refuse, before any work, to replace ``path`` unless it is a JSON file that twla wrote with
    ``"format": fmt`` and ``overwrite`` is given; a missing path is fine."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) or os.path.islink(path):
        raise OutputPathError(f"output {path!r} exists and is not a regular file; name a new file")
    if json_format(path) != fmt:
        raise OutputPathError(
            f"output {path!r} exists and was not written by twla; nothing was changed; name a new file"
        )
    if not overwrite:
        raise OutputPathError(f"output {path!r} already holds a twla {fmt}; pass --overwrite to replace it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(path: str) -> None:
    """Give a finished temporary file or directory (tree) the permissions of a normally created one."""
    mask = _umask()
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _parent(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    remove_stale_scratch(parent)
    return parent


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` only if it succeeded."""
    fd, tmp = tempfile.mkstemp(prefix=_scratch_prefix("tmp"), suffix=os.path.splitext(path)[1], dir=_parent(path))
    os.close(fd)
    try:
        with _refuse_full_disk(path):
            write(tmp)
        _publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def write_json(path: str, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yield a temporary sibling directory to fill; on success it replaces ``path`` (an existing
    directory is moved aside, then removed), on error it is removed and ``path`` is untouched.
    Callers check ``path`` with :func:`check_output_dir` first."""
    parent = _parent(path)
    tmp = tempfile.mkdtemp(prefix=_scratch_prefix("tmp"), dir=parent)
    try:
        with _refuse_full_disk(path):
            yield tmp
        _publish(tmp)
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=_scratch_prefix("old"), dir=parent)
            os.replace(path, os.path.join(old, "previous"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

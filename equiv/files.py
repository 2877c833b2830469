"""Writing files atomically: a reader sees the old file or the whole new one.

Every file equiv writes (checkpoints, ``--json`` reports, ``--plot`` pictures) goes
to a temporary name in the destination's folder, is flushed to disk, and is renamed
over the destination (``os.replace``, atomic on one file system). A failure
anywhere removes the temporary file and leaves the destination as it was.

It behaves as an ordinary write would otherwise: a symbolic link is written
through (the link stays), an existing destination keeps its mode and a new one gets
``0o666`` less the process's umask (the temporary file is created with
``os.open(..., 0o666)``, so the kernel applies the umask: reading the umask would
mean setting it, a global change). A destination that is a folder, or whose name
the file system cannot hold, is refused by name before anything is written, and so
is a read-only one (see :func:`read_only`: root included, whom ``os.access`` lets
write anything).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator

PathLike = str | os.PathLike

_NAME_MAX = 255  # bytes in a file name, where the file system does not say (POSIX's usual)


def name_max(folder: PathLike) -> int:
    """The longest file name, in bytes, that ``folder``'s file system allows.

    >>> name_max(".") >= 14
    True
    """
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):  # no such variable here, or no limit
        return _NAME_MAX


def temporary_name(path: PathLike) -> str:
    """A new hidden name beside ``path``: ``.{name}.{12 hex digits}.tmp``, the name
    part shortened so that the whole fits the file system's limit.

    >>> name = os.path.basename(temporary_name("/tmp/" + "x" * 250 + ".json"))
    >>> name.startswith(".xxx") and name.endswith(".tmp"), len(name) <= name_max("/tmp")
    (True, True)
    """
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    suffix = f".{secrets.token_hex(6)}.tmp"
    room = name_max(folder) - len(os.fsencode("." + suffix))
    while len(os.fsencode(name)) > room:  # in bytes: a character may take several
        name = name[:-1]
    return os.path.join(folder, f".{name}{suffix}")


def create_beside(path: PathLike) -> tuple[int, str]:
    """Create a new, empty temporary file in ``path``'s folder: ``(descriptor, name)``.

    Raises ``OSError`` when the folder cannot be written (callers may use that to
    check a destination before doing expensive work).
    """
    temp = temporary_name(path)
    return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temp


def read_only(path: PathLike) -> bool:
    """Whether an existing file ``path`` is read-only: it has no write permission bit
    (``chmod a-w``), or this process may not write it.

    The bits decide for root too, whom ``os.access`` lets write anything: a file
    made read-only is kept, whoever runs the program.

    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp(), "report.json")
    >>> _ = path.write_text("{}")
    >>> read_only(path)
    False
    >>> path.chmod(0o444)
    >>> read_only(path)
    True
    """
    return not os.stat(path).st_mode & 0o222 or not os.access(path, os.W_OK)


def _refuse_unwritable(path: str) -> None:
    """An ``OSError`` naming ``path`` (never the temporary file) if an ordinary
    write to it would fail or should not happen."""
    folder, name = os.path.split(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a folder; give a file name in it")
    limit = name_max(folder)
    if len(os.fsencode(name)) > limit:
        raise OSError(
            errno.ENAMETOOLONG,
            f"cannot write {path}: its name is longer than the {limit} bytes the file "
            "system allows; give a shorter one",
        )
    if os.path.exists(path) and read_only(path):
        raise PermissionError(f"cannot write {path}: the file is read-only")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary file name beside ``path`` to write; on success it replaces
    ``path``, on any exception it is removed and ``path`` is untouched.

    Example:
      >>> import os, pathlib, tempfile
      >>> target = pathlib.Path(tempfile.mkdtemp(), "out.txt")
      >>> with atomic_path(target) as temp:
      ...     with open(temp, "w") as f:
      ...         _ = f.write("whole")
      >>> target.read_text()
      'whole'
      >>> try:
      ...     with atomic_path(target) as temp:
      ...         with open(temp, "w") as f:
      ...             _ = f.write("half")
      ...         raise RuntimeError("interrupted")
      ... except RuntimeError:
      ...     pass
      >>> target.read_text(), os.listdir(target.parent)
      ('whole', ['out.txt'])
    """
    # Through a symbolic link to its target, so that the link stays a link.
    path = os.path.realpath(os.fspath(path))
    _refuse_unwritable(path)
    fd, temp = create_beside(path)
    # The mode an ordinary write gives: the destination's own, or the umask's.
    # Taken now because some writers (safetensors) replace the file with a 0o600 one.
    mode = os.stat(path if os.path.exists(path) else temp).st_mode & 0o777
    os.close(fd)
    try:
        yield temp
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise

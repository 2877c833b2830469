"""Writing files atomically: a reader sees the old file or the whole new one.

Every file equiv writes (checkpoints, ``--json`` reports, ``--plot`` pictures) goes
to a temporary name in the destination's folder, is flushed to disk, and is renamed
over the destination (``os.replace``, atomic on one file system). A failure
anywhere removes the temporary file and leaves the destination as it was.

It behaves as an ordinary write would otherwise: a symbolic link is written
through (the link stays), a read-only destination is refused, an existing
destination keeps its mode and a new one gets ``0o666`` less the process's umask
(the temporary file is created with ``os.open(..., 0o666)``, so the kernel applies
the umask: reading the umask would mean setting it, a global change).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

PathLike = str | os.PathLike


def create_beside(path: PathLike) -> tuple[int, str]:
    """Create a new, empty temporary file in ``path``'s folder: ``(descriptor, name)``.

    Raises ``OSError`` when the folder cannot be written (callers may use that to
    check a destination before doing expensive work).
    """
    path = os.path.abspath(os.fspath(path))
    temp = os.path.join(
        os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp"
    )
    return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temp


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
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise PermissionError(f"cannot write {path}: the file is read-only")
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

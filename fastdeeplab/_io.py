"""Small I/O helpers shared across the package: output-path validation and atomic writes.

Every file the package writes goes through :func:`atomic_path`, and every command validates its output paths
with :func:`check_output_path` before any work starts, so a bad path fails in a second, not after an export.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "check_output_path", "check_writable_dir"]


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Return the parent directory of ``path`` (created if missing), or raise naming why it is unusable."""
    parent = Path(path).expanduser().resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create output directory {parent}: {exc.strerror or exc}") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {parent} is not writable")
    return parent


def check_output_path(path: str | os.PathLike, *, overwrite: bool = True, what: str = "output") -> Path:
    """Validate a file the caller is about to write, before any work: returns it as an absolute ``Path``.

    Refused, with the target named: an empty path; an existing directory; an existing target that is not a
    regular file (a device, fifo or socket: renaming over it would replace it); an existing read-only file,
    unless ``overwrite``; a parent that cannot be created or written (``/proc``, ``/sys``, read-only mounts).
    """
    if path is None or str(path).strip() == "":
        raise ValueError(f"{what} path is empty")
    target = Path(path).expanduser()
    if target.is_dir():
        raise IsADirectoryError(f"{what} path {target} is a directory; give a file name")
    if target.exists() or target.is_symlink():
        mode = os.stat(target).st_mode if target.exists() else 0
        if target.exists() and not stat.S_ISREG(mode):
            raise ValueError(f"{what} path {target} exists and is not a regular file (a device, fifo or "
                             "socket); refusing to replace it")
        if target.exists() and not overwrite and not os.access(target, os.W_OK):
            raise PermissionError(f"{what} file {target} is read-only; remove it or allow overwriting")
    check_writable_dir(target)
    return target.resolve()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path``, on error removed.

    Nothing is ever half-written: readers see the old file or the complete new one.

    >>> with atomic_path("model.onnx") as tmp:      # doctest: +SKIP
    ...     torch.onnx.export(model, x, tmp)
    """
    target = Path(path).expanduser()
    parent = check_writable_dir(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; the result should get the usual permissions
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise

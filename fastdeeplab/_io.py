"""Small I/O helpers shared across the package: output-path validation and atomic writes.

Every file the package writes goes through :func:`atomic_path`, and every command validates its output paths
with :func:`check_output_path` before any work starts, so a bad path fails in a second, not after an export.

The rules, for every write:

* the target is named in every error, never the temporary file;
* an existing directory, device, fifo or socket is never replaced (``/dev/null`` stays a device, even as root);
* an existing read-only file is replaced only when the caller asks (``overwrite=True``), and keeps its mode;
* the parent must really be writable: a temporary file is created and removed there (``os.access`` says
  ``/proc`` is writable for root, but nothing can be created in it);
* validation creates nothing: missing parent folders are created by :func:`atomic_path` when the work is done;
* temporary files are ``.<name>.fastdeeplab-<pid>-<random><suffix>.tmp`` next to the target; one left by a
  process that no longer runs (a killed export) is removed by the next write of the same target;
* no output of a command replaces one of its inputs (:func:`check_not_input`): paths are compared as files
  (symbolic and hard links, ``./x`` and ``x``), not as strings.

And for every read of a file the package did not just write (caches, configs, lists):
:func:`read_regular_file` reads regular files only (never blocks on a fifo or reads ``/dev/zero`` forever)
and at most a bounded number of bytes; :func:`check_regular_file` holds those checks for readers that parse
the file themselves (ONNX models).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "check_not_input", "check_output_path", "check_regular_file", "check_writable_dir",
           "json_text", "read_regular_file", "same_file", "stale_temp_files"]

_TAG = "fastdeeplab"
_ACTIVE: set[str] = set()  # temporary files this process is writing right now


def _describe(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe(directory: Path, what: str, target: Path) -> None:
    """Create and remove a file in ``directory``: the only test that holds for root, ``/proc`` and read-only
    mounts alike."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{_TAG}-probe-", dir=directory)
    except OSError as exc:
        raise PermissionError(f"cannot write {what} {target}: nothing can be created in "
                              f"{directory} ({exc.strerror or exc})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)


def check_writable_dir(path: str | os.PathLike, *, what: str = "output") -> Path:
    """Return the parent directory of the file ``path``, or raise naming why nothing can be written there.

    The parent may not exist yet (:func:`atomic_path` creates it when writing); then its closest existing
    ancestor must be a writable directory. Nothing is created here.
    """
    target = Path(path).expanduser().absolute()
    parent = target.parent
    existing = _nearest_existing(parent)
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot write {what} {target}: {existing} is not a directory")
    if not os.access(existing, os.X_OK):
        raise PermissionError(f"cannot write {what} {target}: {existing} cannot be entered")
    _probe(existing, what, target)
    return parent


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False, what: str = "output") -> Path:
    """Validate a file the caller is about to write, before any work: returns it as an absolute ``Path``
    (symbolic links resolved, so the file they point to is what gets written).

    Refused, with the target named: ``None``, an empty path or one ending in a separator; an existing
    directory (``IsADirectoryError``); an existing target that is not a regular file, a device, fifo or socket
    (renaming over it would replace it); an existing read-only file unless ``overwrite``; a parent that is not
    a directory or where nothing can be created (``/proc``, ``/sys``, read-only mounts). Creates nothing.
    Writable regular files are replaced as usual (that is what an output path is for).
    """
    if path is None or not str(path).strip():
        raise ValueError(f"{what} path is empty; give a file name")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} path must be a str or os.PathLike, got {type(path).__name__}")
    text = os.fspath(path)
    target = Path(os.path.realpath(Path(text).expanduser()))
    if target.is_dir():
        raise IsADirectoryError(f"{what} path {text} is a directory; give a file name")
    if text.endswith(("/", os.sep)):
        raise IsADirectoryError(f"{what} path {text} names a directory (it ends with a "
                                "separator); give a file name")
    if os.path.lexists(target):
        try:
            mode = os.stat(target).st_mode
        except OSError as exc:
            raise OSError(f"cannot write {what} {target}: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            raise ValueError(f"{what} path {target} exists and is {_describe(mode)}; refusing to replace it "
                             "(give a regular file name)")
        read_only = not mode & 0o222 or not os.access(target, os.W_OK)  # mode bits: root passes os.access
        if read_only and not overwrite:
            raise PermissionError(f"{what} file {target} is read-only; remove it, make it "
                                  "writable or ask to overwrite it")
    check_writable_dir(target, what=what)
    return target


_TMP_RE = re.compile(r"^\.(?P<name>.+)\." + _TAG + r"-(?P<pid>\d+)-[A-Za-z0-9_]+.*\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files that :func:`atomic_path` left next to ``path`` in a process that no longer runs (or
    in this one, outside any write): what the next write of ``path`` removes."""
    target = Path(path)
    parent = target.parent
    if not parent.is_dir():
        return []
    stale = []
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            match = _TMP_RE.match(entry.name)
            if match is None or match["name"] != target.name or str(entry) in _ACTIVE:
                continue
            pid = int(match["pid"])
            if (pid == os.getpid() or not _alive(pid)) and entry.is_file() and not entry.is_symlink():
                stale.append(entry)
    return stale


def _regular_or_absent(target: Path, what: str) -> None:
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} path {target} is now {_describe(mode)}; refusing to replace it")


def _naming_target(exc: Exception, tmp_name: str, target: Path, what: str) -> Exception | None:
    """``exc`` rebuilt to name ``target`` where it names the temporary file (``None``: leave it as is)."""
    try:
        if isinstance(exc, OSError) and exc.filename is not None and os.fspath(exc.filename) == tmp_name:
            return type(exc)(f"cannot write {what} {target}: {exc.strerror or exc}")
        if tmp_name in str(exc):
            return type(exc)(str(exc).replace(tmp_name, str(target)))
    except Exception:  # noqa: BLE001  (an exception type with an unusual constructor: keep the original)
        return None
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", *, overwrite: bool = False,
                what: str = "output") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path``, on error removed.

    Nothing is ever half-written: readers see the old file or the complete new one. ``path`` is validated
    first (:func:`check_output_path`, with ``overwrite`` and ``what``), missing parent folders are created,
    stale temporary files of earlier, killed writes of the same target are removed, and the target is checked
    again just before the rename: a device or folder that appeared meanwhile is never replaced. A replaced
    file keeps its permission bits. Errors name ``path``, not the temporary file.

    >>> with atomic_path("model.onnx") as tmp:      # doctest: +SKIP
    ...     torch.onnx.export(model, x, tmp)
    """
    target = check_output_path(path, overwrite=overwrite, what=what)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the folder of {what} {target}: {exc.strerror or exc}") from None
    for old in stale_temp_files(target):
        with contextlib.suppress(OSError):
            old.unlink()
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{_TAG}-{os.getpid()}-", suffix=suffix + ".tmp",
                                        dir=target.parent)
    except OSError as exc:
        raise OSError(f"cannot write {what} {target}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    _ACTIVE.add(tmp_name)
    try:
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask  # mkstemp makes 0600 files; a new file gets the usual permissions
        os.chmod(tmp, mode)
        try:
            yield tmp
        except Exception as exc:
            renamed = _naming_target(exc, tmp_name, target, what)
            if renamed is None:
                raise
            raise renamed from exc
        _regular_or_absent(target, what)
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise OSError(f"cannot write {what} {target}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        _ACTIVE.discard(tmp_name)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: the same resolved path, or (both existing) the same inode, so
    symbolic links, hard links and other spellings (``./x``, ``d/../x``) compare equal."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if os.path.realpath(pa) == os.path.realpath(pb):
        return True
    try:
        return os.path.samefile(pa, pb)
    except OSError:  # one of them does not exist (yet): the resolved paths decided
        return False


def check_not_input(output: str | os.PathLike, inputs, *, what: str = "output") -> None:
    """Raise ``ValueError`` naming both when ``output`` is the same file as one of ``inputs`` (``None``
    entries are skipped): a command never replaces its own input. Call it before any work."""
    for name, path in (inputs.items() if isinstance(inputs, dict) else ((None, p) for p in inputs)):
        if path is None:
            continue
        if same_file(output, path):
            label = f"the {name} input" if name else "an input"
            raise ValueError(f"{what} path {os.fspath(output)} is {label} of this command ({os.fspath(path)}); "
                             f"writing it would replace that file: give another {what} path")


def _strict(value):
    """``value`` with every non-finite float replaced by ``None`` (tensors and numpy values as lists/numbers)."""
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    tolist = getattr(value, "tolist", None)  # torch tensors, numpy arrays and scalars
    if callable(tolist) and type(value).__module__.split(".")[0] in ("torch", "numpy"):
        return _strict(tolist())
    return value


def json_text(obj, **kwargs) -> str:
    """Strict JSON (RFC 8259) of ``obj``: NaN and infinities, which ``json.dumps`` writes as the non-JSON
    tokens ``NaN``/``Infinity``, become ``null`` (an undefined score, e.g. the IoU of a class absent from
    truth and prediction); tensors and numpy values become lists and numbers. Every JSON file the package
    writes goes through this, so strict parsers (``jq``, browsers, Go, Rust) read it."""
    import json

    return json.dumps(_strict(obj), allow_nan=False, **kwargs)


def check_regular_file(path: str | os.PathLike, *, what: str = "file", max_bytes: int | None = None,
                       limit_note: str = "") -> os.stat_result:
    """The ``os.stat`` of ``path`` if it is a regular file of at most ``max_bytes`` (no bound: ``None``), without
    opening it (a fifo never blocks, a device is never read). The one home of these checks for every file the
    package reads: :func:`read_regular_file`, the ONNX reader (:func:`fastdeeplab.runtime.check_onnx_file`).
    Errors are one line naming ``path``: ``FileNotFoundError``, ``ValueError`` (a folder, device, fifo or socket;
    too large, followed by ``limit_note`` when given) or ``OSError``."""
    name = os.fspath(path)
    try:
        st = os.stat(Path(path).expanduser())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {name} does not exist") from None
    except OSError as exc:
        raise OSError(f"cannot read {what} {name}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} {name} is {_describe(st.st_mode)}, not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        note = f" ({limit_note})" if limit_note else ""
        raise ValueError(f"{what} {name} is {st.st_size} bytes, more than the {max_bytes} allowed{note}")
    return st


def read_regular_file(path: str | os.PathLike, *, max_bytes: int, what: str = "file", binary: bool = False,
                      head: int | None = None, limit_note: str = "") -> str | bytes:
    """The contents of ``path`` (text, UTF-8, a leading BOM dropped; or bytes), read safely: only a regular
    file (a fifo, device or folder is refused without opening it, so nothing blocks), and at most
    ``max_bytes`` (a larger file is refused before it is read): :func:`check_regular_file`, with
    ``limit_note``. ``head``: only the first ``head`` bytes (a reader that looks at a file's start, the bound
    still applying to the whole file). Errors are one line naming ``path``: ``FileNotFoundError``,
    ``ValueError`` (not a regular file, too large, not UTF-8) or ``OSError``."""
    name = os.fspath(path)
    check_regular_file(path, what=what, max_bytes=max_bytes, limit_note=limit_note)
    try:
        # O_NONBLOCK: if the path was swapped for a fifo since the stat, open does not wait for a writer
        fd = os.open(Path(path).expanduser(), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ValueError(f"{what} {name} is {_describe(mode)}, not a regular file")
            data = f.read(max_bytes + 1 if head is None else min(head, max_bytes + 1))
    except OSError as exc:
        raise OSError(f"cannot read {what} {name}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ValueError(f"{what} {name} is more than the {max_bytes} bytes allowed")
    if binary:
        return data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {name} is not UTF-8 text (byte {exc.start})") from None


# Either variable names the package's cache folder (FASTDEEPLAB_CACHE_DIR first: the dispatch cache's name,
# which the GPU check sets to keep its decisions apart).
CACHE_ENVS = ("FASTDEEPLAB_CACHE_DIR", "FASTDEEPLAB_CACHE")


def cache_dir() -> Path:
    """The one cache folder of the package (dispatch decisions, the synthetic model, the serving server and its
    environment): ``$FASTDEEPLAB_CACHE_DIR`` or ``$FASTDEEPLAB_CACHE``, else ``$XDG_CACHE_HOME/fastdeeplab``,
    else ``~/.cache/fastdeeplab``. Creates nothing."""
    for name in CACHE_ENVS:
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fastdeeplab"

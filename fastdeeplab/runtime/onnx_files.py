"""Reading ONNX files: the one place every reader of an ``.onnx`` file goes through (ONNX Runtime and OpenVINO
sessions, the export's checks, quantization, the TensorRT build, deploy).

A file that is not an ONNX model gets one line naming it and saying what it looks like, before any library
parses it: a folder, device or fifo (refused without opening it), an empty file, an image, a checkpoint, text,
or a truncated or corrupt protobuf. The libraries' own errors (protobuf's ``DecodeError``, ONNX Runtime's
``InvalidProtobuf``, OpenVINO's multi-line ``RuntimeError``) never reach the caller raw.

* :func:`check_onnx_file` — the cheap checks on the file itself (no parsing; no package needed);
* :func:`load_onnx` — those checks, then the ``onnx.ModelProto`` (the ``onnx`` package);
* :func:`onnx_load_error` — a runtime's error while reading a model, as that one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import read_regular_file

if TYPE_CHECKING:
    import onnx

__all__ = ["MAX_ONNX_BYTES", "check_onnx_file", "load_onnx", "onnx_load_error"]

MAX_ONNX_BYTES = 2**31 - 1  # protobuf's limit for one message; larger models keep their weights in external files
_LIMIT_NOTE = "protobuf's 2 GiB limit for one ONNX file; larger models keep their weights in external data files"
_ADVICE = "export one with fastdeeplab.export_onnx() or `fastdeeplab export`"
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"PK\x03\x04", "a zip archive (a PyTorch checkpoint?)"),
    (b"\x80\x02", "a Python pickle (a PyTorch checkpoint?)"),
    (b"\x7fELF", "an executable"),
)


def _looks_like(head: bytes) -> str | None:
    """What the first bytes of a file say it is, when that is clearly not ONNX."""
    for magic, kind in _SIGNATURES:
        if head.startswith(magic):
            return kind
    sample = head[:512]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "text"
    return None


def check_onnx_file(path: str | os.PathLike, *, what: str = "ONNX model") -> Path:
    """``path`` as a :class:`~pathlib.Path` if it can be an ONNX model: it exists, is a regular file (a fifo or
    device is refused without opening it), is not empty, not over :data:`MAX_ONNX_BYTES`, and does not start
    like another format (image, checkpoint, text). The file checks are :func:`fastdeeplab._io.read_regular_file`'s
    (only the first 512 bytes are read). Raises ``FileNotFoundError``, ``ValueError`` or ``OSError``, one
    line naming ``path``. Does not parse the protobuf: :func:`load_onnx` does."""
    head = read_regular_file(path, what=what, max_bytes=MAX_ONNX_BYTES, binary=True, head=512,
                             limit_note=_LIMIT_NOTE)
    if not head:
        raise ValueError(f"{what} {os.fspath(path)} is empty (0 bytes); {_ADVICE}")
    kind = _looks_like(head)
    if kind is not None:
        raise ValueError(f"{what} {os.fspath(path)} is not an ONNX model: it looks like {kind}; {_ADVICE}")
    return Path(path).expanduser()


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # OpenVINO: "Exception from src/...:84:" lines first, the reason last; ONNX Runtime: "[ONNXRuntimeError] : 7
    # : INVALID_PROTOBUF : Load model from x failed:Protobuf parsing failed."
    lines = [line for line in lines if not line.startswith(("Exception from src", "Check '"))
             and not line.endswith(":")] or lines
    text = lines[0] if lines else type(exc).__name__
    if "failed:" in text and text.startswith("[ONNXRuntimeError]"):
        text = text.rsplit("failed:", 1)[1].strip()
    return text[:300]


def onnx_load_error(source: Any, exc: BaseException, *, runtime: str, what: str = "ONNX model") -> ValueError:
    """The one-line error for ``runtime`` failing to read ``source`` (a path, bytes or a ModelProto). For a
    file, :func:`load_onnx` says what is wrong with it when it can (the ``onnx`` package installed)."""
    if isinstance(source, (str, os.PathLike)):
        try:
            load_onnx(source, what=what, load_external_data=False)
        except ValueError as reason:
            return reason
        except Exception:  # noqa: BLE001  (onnx missing or it reads the file: the runtime's reason follows)
            pass
        where = f"{what} {os.fspath(source)}"
    elif isinstance(source, (bytes, bytearray)):
        where = f"{what} (the given {len(source)} bytes)"
    else:
        where = f"{what} (the given {type(source).__name__})"
    return ValueError(f"{runtime} could not read {where}: {_first_line(exc)}")


def load_onnx(path: str | os.PathLike, *, what: str = "ONNX model", load_external_data: bool = True) -> onnx.ModelProto:
    """The ``onnx.ModelProto`` in ``path``, after :func:`check_onnx_file`; a protobuf that does not parse, or
    parses to no graph, is a ``ValueError`` naming ``path``. ``load_external_data=False`` skips the weights
    kept beside the file (enough to read the graph's inputs and nodes)."""
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("reading ONNX files needs the onnx package: pip install 'fastdeeplab[onnx]'") from exc
    p = check_onnx_file(path, what=what)
    try:
        model = onnx.load(os.fspath(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001  (protobuf's DecodeError and friends)
        raise ValueError(f"{what} {os.fspath(path)} is not a readable ONNX model (truncated or corrupt: "
                         f"{_first_line(exc)}); {_ADVICE}") from None
    if not model.graph.node and not model.graph.input and not model.graph.output:
        raise ValueError(f"{what} {os.fspath(path)} holds no ONNX graph (truncated or not an ONNX file); {_ADVICE}")
    if load_external_data:
        from onnx.external_data_helper import load_external_data_for_model, uses_external_data

        if any(uses_external_data(t) for t in model.graph.initializer):
            try:
                load_external_data_for_model(model, os.fspath(p.parent))
            except (OSError, ValueError) as exc:
                raise ValueError(f"{what} {os.fspath(path)}: its external weights cannot be read "
                                 f"({_first_line(exc)})") from None
    return model

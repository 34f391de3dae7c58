"""The one home of the file checks for reads (``_io.check_regular_file``), used by ``read_regular_file`` and the
ONNX reader (``runtime.onnx_files.check_onnx_file``): the same one-line errors naming the file, for either."""

from __future__ import annotations

import os
import threading

import pytest

from fastdeeplab._io import check_regular_file, read_regular_file
from fastdeeplab.runtime.onnx_files import MAX_ONNX_BYTES, check_onnx_file


def _one_line(exc: pytest.ExceptionInfo, path) -> str:
    text = str(exc.value)
    assert "\n" not in text and os.fspath(path) in text, text
    return text


def test_check_regular_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"12345")
    assert check_regular_file(f, max_bytes=5).st_size == 5
    assert check_regular_file(f).st_size == 5  # no bound
    with pytest.raises(ValueError, match=r"is 5 bytes, more than the 4 allowed \(why\)") as exc:
        check_regular_file(f, what="list", max_bytes=4, limit_note="why")
    assert _one_line(exc, f).startswith("list ")
    with pytest.raises(FileNotFoundError, match="does not exist") as exc:
        check_regular_file(tmp_path / "nope", what="config")
    _one_line(exc, tmp_path / "nope")
    with pytest.raises(ValueError, match="is a directory, not a regular file") as exc:
        check_regular_file(tmp_path)
    _one_line(exc, tmp_path)
    with pytest.raises(ValueError, match="is a character device, not a regular file"):
        check_regular_file("/dev/zero", max_bytes=10)


def _readers():
    return {"read_regular_file": lambda p, what: read_regular_file(p, max_bytes=1 << 20, what=what),
            "check_onnx_file": lambda p, what: check_onnx_file(p, what=what)}


@pytest.mark.parametrize("reader", ["read_regular_file", "check_onnx_file"])
def test_readers_share_the_file_checks(tmp_path, reader):
    """Missing, folder, fifo (without blocking) and device: the same message from both readers."""
    call = _readers()[reader]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path, exc_type, reason in ((tmp_path / "missing.onnx", FileNotFoundError, "does not exist"),
                                   (tmp_path, ValueError, "is a directory, not a regular file"),
                                   (fifo, ValueError, "is a fifo, not a regular file"),
                                   ("/dev/zero", ValueError, "is a character device, not a regular file")):
        result: list = []
        worker = threading.Thread(target=lambda p=path, r=result: r.append(_catch(call, p)), daemon=True)
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), f"{reader} blocked on {path}"
        exc = result[0]
        assert isinstance(exc, exc_type), (path, exc)
        text = str(exc)
        assert text == f"the thing {os.fspath(path)} {reason}", text


def _catch(call, path):
    try:
        call(path, "the thing")
    except Exception as exc:  # noqa: BLE001  (the test compares the exception itself)
        return exc
    return None


def test_onnx_size_bound_and_head(tmp_path):
    """A file over protobuf's limit is refused from its size (a sparse file: nothing is read); a regular ONNX file
    is only looked at (its first bytes), whatever its size."""
    big = tmp_path / "big.onnx"
    with open(big, "wb") as f:
        f.truncate(MAX_ONNX_BYTES + 1)
    with pytest.raises(ValueError, match=r"more than the 2147483647 allowed \(protobuf's 2 GiB limit") as exc:
        check_onnx_file(big)
    _one_line(exc, big)
    ok = tmp_path / "ok.onnx"
    ok.write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(4096))  # a ModelProto's first fields, then zeros
    assert check_onnx_file(ok) == ok
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\)"):
        check_onnx_file(empty)


def test_read_regular_file_head(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abcdef")
    assert read_regular_file(f, max_bytes=6, binary=True, head=2) == b"ab"
    assert read_regular_file(f, max_bytes=6, head=100) == "abcdef"
    with pytest.raises(ValueError, match="is 6 bytes, more than the 5 allowed"):
        read_regular_file(f, max_bytes=5, head=2)  # the bound is the whole file's

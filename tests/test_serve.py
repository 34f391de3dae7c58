"""``fastdeeplab serve`` against a REAL tritonserver on loopback: answers over HTTP and gRPC equal ONNX Runtime on
the same ``model.onnx``, dynamic batching forms batches, bad requests get error responses naming the problem and
leave the server serving, a server killed mid-request starts again, SIGTERM leaves no process.

The server (the ``nvidia-pytriton`` wheel's tritonserver) and the python backend's environment are fetched and
built into the cache by the code under test on first use (PyPI access needed once). Ports are picked free at run
time; every loop is bounded; every server is stopped at the end.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _models import randomize_bn
from PIL import Image
from test_export_onnx import TinySeg

import fastdeeplab
from fastdeeplab.export.onnx import ort_session
from fastdeeplab.images import load_image, skimage_photo_paths
from fastdeeplab.metrics import pixel_agreement
from fastdeeplab.serve import TritonServer
from fastdeeplab.serve.server import _shared_memory_of_group

pytestmark = [pytest.mark.serve, pytest.mark.slow,
              pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                                 reason="the bundled tritonserver runs on Linux x86_64 only")]

MODEL = "deeplabv3_python"
MAX_PIXELS = 129 * 129
SIZES = [(65, 97), (97, 129), (129, 65)]  # (H, W) of the photos sent


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = randomize_bn(TinySeg(classes=5)).eval()
    path = tmp_path_factory.mktemp("serve") / "repo"
    fastdeeplab.deploy(model, path, input_size=(65, 81), max_image_pixels=MAX_PIXELS, max_queue_delay_us=50_000,
                       preferred_batch_sizes=(4, 8))
    return path


@pytest.fixture(scope="module")
def server(repo):
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, ready_timeout=600) as running:
        yield running


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Real photographs (scikit-image's), resized to small awkward sizes: [H, W, 3] uint8."""
    paths = skimage_photo_paths()
    return [np.asarray(load_image(p).resize((w, h), Image.BILINEAR)) for p, (h, w) in zip(paths, SIZES)]


def reference_labels(repo: Path, batch: np.ndarray) -> np.ndarray:
    session = ort_session(repo / MODEL / "1" / "model.onnx")
    return session.run(["labels"], {"input": batch})[0]


def as_batch(*images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.stack([im.transpose(2, 0, 1) for im in images]))


def infer_http(url: str, batch: np.ndarray, timeout: float = 120) -> np.ndarray:
    import tritonclient.http as triton_http

    client = triton_http.InferenceServerClient(url, network_timeout=timeout, connection_timeout=timeout)
    tensor = triton_http.InferInput("input", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    return client.infer(MODEL, [tensor]).as_numpy("labels")


def raw_http(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """POST ``body`` to the model's infer endpoint as is: status and the server's error text."""
    host, port = url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request("POST", f"/v2/models/{MODEL}/infer", body=body,
                           headers={"Content-Type": "application/octet-stream", **(headers or {})})
        response = connection.getresponse()
        text = response.read().decode(errors="replace")
    finally:
        connection.close()
    try:
        return response.status, json.loads(text).get("error", text)
    except ValueError:
        return response.status, text


def json_request(shape: list[int], datatype: str = "UINT8", data: list | None = None, name: str = "input") -> bytes:
    count = int(np.prod(shape)) if shape else 0
    return json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": datatype,
                                   "data": data if data is not None else [1] * count}]}).encode()


def test_repository_holds_the_python_model_and_the_onnxruntime_one(repo, server):
    assert (repo / MODEL / "1" / "model.py").is_file() and (repo / "deeplabv3" / "1" / "model.onnx").is_file()
    assert server.models == {MODEL: "python"}
    assert "onnxruntime" in server.skipped["deeplabv3"]  # the bundled server has the python backend only
    assert os.path.samefile(repo / MODEL / "1" / "model.onnx", repo / "deeplabv3" / "1" / "model.onnx") or \
        (repo / MODEL / "1" / "model.onnx").read_bytes() == (repo / "deeplabv3" / "1" / "model.onnx").read_bytes()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_answers_equal_onnxruntime_on_real_photos(repo, server, photos, protocol):
    from fastdeeplab.serve.client import TritonClient

    url = server.http_url if protocol == "http" else server.grpc_url
    client = TritonClient(url, protocol=protocol)  # picks the only ready model
    assert client.model == MODEL
    for image in photos:
        served = client.labels(image)
        expected = reference_labels(repo, as_batch(image))[0]
        assert served.shape == image.shape[:2] and served.dtype == np.uint8
        assert pixel_agreement(served, expected) >= 0.999, f"{protocol} {image.shape}"
    same_size = [np.asarray(Image.fromarray(p).resize((81, 65))) for p in photos]
    batch = as_batch(*same_size)
    served = infer_http(server.http_url, batch)
    assert pixel_agreement(served, reference_labels(repo, batch)) >= 0.999
    # serving leaves the repository as deploy wrote it: the stub's Python writes no model.py bytecode there
    assert not [str(p) for p in repo.rglob("__pycache__")]


def model_statistics(url: str) -> tuple[int, int, dict[int, int]]:
    import tritonclient.http as triton_http

    stats = triton_http.InferenceServerClient(url).get_inference_statistics(MODEL)["model_stats"][0]
    batches = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}
    return int(stats["inference_count"]), int(stats["execution_count"]), batches


def test_dynamic_batching_under_concurrent_requests(repo, server, photos):
    image = np.asarray(Image.fromarray(photos[0]).resize((81, 65)))
    expected = reference_labels(repo, as_batch(image))[0]
    before = model_statistics(server.http_url)
    results: list[np.ndarray | BaseException] = []

    def one() -> None:
        try:
            results.append(infer_http(server.http_url, as_batch(image))[0])
        except BaseException as exc:  # noqa: BLE001 - reported below
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 12 and all(isinstance(r, np.ndarray) for r in results), results
    assert all(pixel_agreement(r, expected) >= 0.999 for r in results)
    inferences, executions, batches = model_statistics(server.http_url)
    assert inferences - before[0] == 12
    assert executions - before[1] < 12, "every request ran alone: no batch formed"
    assert any(size > 1 for size in batches), batches


def bad_requests(photo: np.ndarray) -> list:
    good = as_batch(photo)
    h, w = good.shape[-2:]
    big = 130  # > MAX_PIXELS
    return [
        pytest.param(json_request([1, 3, 4, 4], "FP32", [0.5] * 48), r"FP32|UINT8", id="wrong-dtype"),
        pytest.param(json_request([3, 4, 4]), r"shape|rank|dims", id="wrong-rank"),
        pytest.param(json_request([0, 3, h, w], data=[]), r"batch|0|shape", id="zero-batch"),
        pytest.param(json_request([1, 3, big, big]), r"too large", id="too-large-image"),
        pytest.param(json_request([1, 3, 4, 4]), r"too small", id="too-small-image"),
        pytest.param(json.dumps({"inputs": []}).encode(), r"input", id="missing-input"),
        pytest.param(json_request([1, 3, 4, 4], name="image"), r"input|image", id="wrong-input-name"),
        # tritonserver 2.51 answers an unparsable body with 500 (its status, not ours), naming the JSON error
        pytest.param(b"\x89PNG\r\n\x1a\n\x00\xff garbage", r"failed to parse the request JSON", id="garbage-bytes"),
    ]


@pytest.mark.parametrize("body, message", bad_requests(np.zeros((65, 81, 3), np.uint8)))
def test_bad_request_gets_an_error_naming_it_and_the_server_keeps_serving(repo, server, photos, body, message):
    status, error = raw_http(server.http_url, body)
    assert status == (500 if b"garbage" in body else 400), (status, error)
    assert re.search(message, error), error
    good = as_batch(photos[0])
    assert pixel_agreement(infer_http(server.http_url, good), reference_labels(repo, good)) >= 0.999


def test_binary_body_with_the_wrong_byte_count_is_refused(repo, server, photos):
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 65, 81], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 100}}]}).encode()
    status, error = raw_http(server.http_url, header + b"\x07" * 100,
                             {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and re.search(r"byte size|bytes|size", error), (status, error)
    good = as_batch(photos[1])
    assert pixel_agreement(infer_http(server.http_url, good), reference_labels(repo, good)) >= 0.999


def test_grpc_bad_request_is_an_error_and_the_next_is_answered(repo, server, photos):
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException

    client = triton_grpc.InferenceServerClient(server.grpc_url)
    tensor = triton_grpc.InferInput("input", [1, 3, 130, 130], "UINT8")
    tensor.set_data_from_numpy(np.zeros((1, 3, 130, 130), np.uint8))
    with pytest.raises(InferenceServerException, match="too large"):
        client.infer(MODEL, [tensor], client_timeout=120)
    good = as_batch(photos[2])
    tensor = triton_grpc.InferInput("input", list(good.shape), "UINT8")
    tensor.set_data_from_numpy(good)
    served = client.infer(MODEL, [tensor], client_timeout=120).as_numpy("labels")
    assert pixel_agreement(served, reference_labels(repo, good)) >= 0.999


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc), children first seen included."""
    found, frontier = set(), [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with_children = task / "children"
            if with_children.is_file():
                for child in with_children.read_text().split():
                    if int(child) not in found:
                        found.add(int(child))
                        frontier.append(int(child))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pids: set[int], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = {p for p in pids if _alive(p)}
        if not left:
            return left
        time.sleep(0.2)
    return {p for p in pids if _alive(p)}


def test_server_killed_mid_request_starts_again_and_serves(repo, photos):
    good = as_batch(photos[1])
    expected = reference_labels(repo, good)
    first = TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, ready_timeout=600).start()
    try:
        pids = _descendants(first.process.pid) | {first.process.pid}
        regions = _shared_memory_of_group(first.process.pid)
        assert regions, "the python backend maps no shared memory: did the stub start?"
        assert len(pids) >= 2, "no python backend stub process under tritonserver"
        outcome: list[BaseException | np.ndarray] = []
        big = np.ascontiguousarray(np.repeat(good, 8, axis=0))  # a batch of 8: the server is busy with it
        request = threading.Thread(target=lambda: outcome.append(_catch(infer_http, first.http_url, big, 60)))
        request.start()
        time.sleep(0.3)
        os.kill(first.process.pid, signal.SIGKILL)
        request.join(90)
        assert not request.is_alive() and outcome, "the client hung on a killed server"
        assert isinstance(outcome[0], BaseException) or outcome[0].shape == (8, *good.shape[-2:])
    finally:
        started = time.monotonic()
        first.stop()  # the launcher ends what the killed server left (its stub) within seconds
    assert time.monotonic() - started < 30
    assert not _wait_gone(pids, 5), "processes left after the killed server was stopped"
    assert not [r for r in regions if r.exists()], "shared memory left in /dev/shm"
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, ready_timeout=600) as second:
        assert pixel_agreement(infer_http(second.http_url, good), expected) >= 0.999


def _catch(function, *args):
    try:
        return function(*args)
    except BaseException as exc:  # noqa: BLE001
        return exc


def test_cli_serves_until_sigterm_and_leaves_no_process(repo, photos, tmp_path):
    command = [sys.executable, "-m", "fastdeeplab", "serve", str(repo), "--http-port", "0", "--grpc-port", "0",
               "--metrics-port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        lines, url = [], None
        deadline = time.monotonic() + 600
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"HTTP:\s+http://([\d.]+:\d+)", line)
            url = match.group(1) if match else None
        assert url, "".join(lines) + process.stderr.read() if process.poll() is not None else "".join(lines)
        for line in iter(process.stdout.readline, ""):
            lines.append(line)
            if "fastdeeplab client" in line:
                break
        client_line = next(line for line in lines if "fastdeeplab client" in line)
        # the printed client command, as a person would run it
        args = client_line.split("try:", 1)[1].split()[2:]
        args[args.index("photo.jpg")] = str(tmp_path / "photo.png")
        args[args.index("masks")] = str(tmp_path / "masks")
        Image.fromarray(photos[0]).save(tmp_path / "photo.png")
        from fastdeeplab.cli import main

        assert main(["client", *args]) == 0
        mask = np.asarray(Image.open(tmp_path / "masks" / "photo_mask.png"))
        expected = reference_labels(repo, as_batch(photos[0]))[0]
        assert pixel_agreement(mask, expected) >= 0.999
        assert (tmp_path / "masks" / "photo_overlay.png").is_file()

        pids = _descendants(process.pid)
        assert len(pids) >= 2  # tritonserver and its python backend stub
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        assert time.monotonic() - started < 30
        assert not _wait_gone(pids, 10), "processes left after SIGTERM"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


def test_deploy_writes_the_backends_asked_for(tmp_path):
    from fastdeeplab.export.deploy import load_model_config

    torch.manual_seed(0)
    model = TinySeg().eval()
    with pytest.raises(ValueError, match="backends"):  # refused before any export
        fastdeeplab.deploy(model, tmp_path / "bad", input_size=(33, 33), backends=("onnx",))
    assert not (tmp_path / "bad").exists()
    fastdeeplab.deploy(model, tmp_path / "py", input_size=(33, 33), backends=("python",), max_image_pixels=999,
                       check=False)
    assert sorted(p.name for p in (tmp_path / "py").iterdir()) == ["README.md", MODEL]
    config = load_model_config(tmp_path / "py" / MODEL / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == 8
    assert config.parameters["max_image_pixels"].string_value == "999"
    assert [i.name for i in config.input] == ["input"] and list(config.input[0].dims) == [3, -1, -1]
    assert "fastdeeplab serve" in (tmp_path / "py" / "README.md").read_text()


@pytest.mark.parametrize("array, message", [
    pytest.param(np.zeros((1, 3, 9, 9), np.float32), "data type float32, expected uint8", id="dtype"),
    pytest.param(np.zeros((3, 9, 9), np.uint8), "rank 3", id="rank"),
    pytest.param(np.zeros((0, 3, 9, 9), np.uint8), "batch size 0", id="empty"),
    pytest.param(np.zeros((1, 4, 9, 9), np.uint8), "4 in dimension 1", id="channels"),
    pytest.param(np.zeros((1, 3, 11, 10), np.uint8), "too large", id="large"),
    pytest.param(np.zeros((1, 3, 7, 9), np.uint8), "too small", id="small"),
])
def test_model_py_request_checks_name_the_problem(array, message):
    from fastdeeplab.export.triton_model import RequestError, check_image_batch

    with pytest.raises(RequestError, match=message):
        check_image_batch("input", array, np.uint8, [3, -1, -1], max_pixels=100, min_size=8)
    check_image_batch("input", np.zeros((2, 3, 10, 10), np.uint8), np.uint8, [3, -1, -1], max_pixels=100, min_size=8)
    with pytest.raises(RequestError, match="NaN"):
        check_image_batch("x", np.full((1, 3, 9, 9), np.nan, np.float32), np.float32, [3, -1, -1], max_pixels=100,
                          min_size=8)


def test_model_py_groups_requests_by_image_size_and_refuses_numpy_2():
    from fastdeeplab.export.triton_model import check_numpy, group_by_shape

    assert group_by_shape([(1, 3, 8, 8), (2, 3, 9, 8), (1, 3, 8, 8)]) == [[0, 2], [1]]
    check_numpy("1.26.4")
    with pytest.raises(RuntimeError, match="numpy<2"):
        check_numpy("2.1.0")


def test_serve_refuses_a_bad_repository_and_a_busy_port_in_one_line(repo, tmp_path):
    import socket

    from fastdeeplab.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no model"):
        TritonServer(empty).start()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"--http-port {port}: .* in use"):
            TritonServer(repo, http_port=port, grpc_port=0, metrics_port=0).start()
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(tmp_path / "missing")])
    assert exit_info.value.code == 2

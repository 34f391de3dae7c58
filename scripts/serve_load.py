"""Load on a real tritonserver (``fastdeeplab serve``'s) against the same model in-process: throughput, p50, p99.

A benchmark, not a test. It deploys DeepLabV3 (ResNet-50 by default, output stride 16, uint8 in / uint8 labels
out) with ``fastdeeplab deploy``, starts :class:`fastdeeplab.serve.TritonServer` on loopback, and at each
concurrency (default 1, 2, 4, 8) runs a closed loop of that many clients, each sending one 513x513 real photo per
request and sending the next when the answer arrives:

* ``triton-http``: the python-backend model over HTTP (binary tensors), with dynamic batching;
* ``in-process``: the same ``model.onnx`` in ONNX Runtime, called from as many threads (one shared session).

Both modes run at each level back to back, in alternating order per round, so a change of machine load hits
both. The load generator is Python (threads, one tritonclient each): ``perf_analyzer`` ships only in the
tritonclient 2.50/2.51 wheels (which need numpy<2) and needs CUDA's runtime library even on a CPU; the
repository's README gives its command for machines that have it.
The table, versions and load go to stdout and ``--results`` (a markdown section appended), the plot to ``--plot``.

    python scripts/serve_load.py --requests 24 --results bench/RESULTS.md --plot bench/serve_load.png
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def photos(size: int, count: int) -> list[np.ndarray]:
    from PIL import Image

    from fastdeeplab.images import load_image, skimage_photo_paths

    paths = skimage_photo_paths()
    return [np.asarray(load_image(paths[i % len(paths)]).resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)[None]
            .copy() for i in range(count)]


def closed_loop(call, images: list[np.ndarray], concurrency: int, requests: int) -> tuple[float, list[float]]:
    """``concurrency`` threads share ``requests`` calls; returns (images per second, latencies in seconds)."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    errors: list[BaseException] = []

    def worker(state: dict) -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            start = time.perf_counter()
            try:
                call(state, images[index % len(images)])
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker, args=({},)) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    return len(latencies) / elapsed, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deeplabv3_resnet50")
    parser.add_argument("--size", type=int, default=513)
    parser.add_argument("--output-stride", type=int, default=16, choices=(8, 16))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=24, help="requests per level and mode per round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--repo", type=Path, default=None, help="an existing repository (default: deploy one)")
    parser.add_argument("--results", type=Path, default=None, help="append a markdown section to this file")
    parser.add_argument("--plot", type=Path, default=None, help="PNG plot of throughput and p99 vs concurrency")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    import tritonclient.http as triton_http

    import fastdeeplab
    from fastdeeplab.metrics import pixel_agreement
    from fastdeeplab.serve import TritonServer
    from fastdeeplab.serve.server import PYTRITON_VERSION, find_tritonserver

    work = Path(tempfile.mkdtemp(prefix="serve_load."))
    try:
        repo = args.repo
        if repo is None:
            torch.manual_seed(0)
            model = fastdeeplab.get_model(args.model, num_classes=21, output_stride=args.output_stride).eval()
            repo = work / "repo"
            print(f"deploying {args.model} OS{args.output_stride} at {args.size}x{args.size} ...", flush=True)
            fastdeeplab.deploy(model, repo, input_size=(args.size, args.size), output_stride=args.output_stride,
                               backends=("python",), check=False)
        onnx_file = repo / "deeplabv3_python" / "1" / "model.onnx"
        images = photos(args.size, 8)
        session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])

        def in_process(state: dict, image: np.ndarray) -> np.ndarray:
            return session.run(["labels"], {"input": image})[0]

        with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, ready_timeout=900,
                          progress=lambda m: print(m, flush=True)) as server:
            def served(state: dict, image: np.ndarray) -> np.ndarray:
                if "client" not in state:
                    state["client"] = triton_http.InferenceServerClient(server.http_url, network_timeout=600,
                                                                        connection_timeout=600)
                tensor = triton_http.InferInput("input", list(image.shape), "UINT8")
                tensor.set_data_from_numpy(image)
                return state["client"].infer("deeplabv3_python", [tensor]).as_numpy("labels")

            agreement = pixel_agreement(served({}, images[0]), in_process({}, images[0]))
            for mode in (served, in_process):  # warm-up
                closed_loop(mode, images, 2, 4)
            stats0 = triton_http.InferenceServerClient(server.http_url).get_inference_statistics(
                "deeplabv3_python")["model_stats"][0]
            results: dict[tuple[str, int], list[float]] = {}
            rates: dict[tuple[str, int], list[float]] = {}
            loads = []
            for round_index in range(args.rounds):
                for concurrency in args.concurrency:
                    modes = [("triton-http", served), ("in-process", in_process)]
                    if (round_index + args.concurrency.index(concurrency)) % 2:
                        modes.reverse()
                    for name, call in modes:
                        rate, lat = closed_loop(call, images, concurrency, args.requests)
                        results.setdefault((name, concurrency), []).extend(lat)
                        rates.setdefault((name, concurrency), []).append(rate)
                        loads.append(os.getloadavg()[0])
                        print(f"{name:12s} c={concurrency}: {rate:.2f} img/s, p50 {np.percentile(lat, 50) * 1e3:.0f} ms",
                              flush=True)
            stats1 = triton_http.InferenceServerClient(server.http_url).get_inference_statistics(
                "deeplabv3_python")["model_stats"][0]
        inferences = int(stats1["inference_count"]) - int(stats0["inference_count"])
        executions = int(stats1["execution_count"]) - int(stats0["execution_count"])
        install = find_tritonserver()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for concurrency in args.concurrency:
        for name in ("triton-http", "in-process"):
            lat = np.array(results[(name, concurrency)]) * 1e3
            rows.append((concurrency, name, float(np.mean(rates[(name, concurrency)])), np.percentile(lat, 50),
                         np.percentile(lat, 99), len(lat)))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    server_desc = f"tritonserver 2.51.0 (nvidia-pytriton {PYTRITON_VERSION})" if install.bundled else str(install.executable)
    lines = [
        f"Machine: {cpu}, {os.cpu_count()} logical CPUs, {memory:.0f} GiB; load average during the run "
        f"{min(loads):.1f}-{max(loads):.1f} (other jobs shared the CPUs).",
        f"Versions: {server_desc}, python backend model over onnxruntime {ort.__version__}, clients tritonclient "
        f"{importlib.metadata.version('tritonclient')} (HTTP, binary tensors), Python {platform.python_version()}.",
        f"Load: {args.model}, output stride {args.output_stride}, random weights (seed 0), uint8 RGB "
        f"{args.size}x{args.size} real photos (scikit-image), batch 1 per request, closed loop; {args.requests} "
        f"requests per level and mode, {args.rounds} round(s), modes alternating. Dynamic batching: "
        f"{inferences} inferences in {executions} executions (mean batch {inferences / max(executions, 1):.2f}). "
        f"Served labels vs in-process: {agreement * 100:.3f}% of pixels equal. p99 of {args.requests * args.rounds} "
        "requests is close to their maximum.",
        "",
        "| concurrency | mode | img/s | p50 ms | p99 ms | requests |",
        "|---|---|---|---|---|---|",
        *[f"| {c} | {n} | {r:.2f} | {p50:.0f} | {p99:.0f} | {k} |" for c, n, r, p50, p99, k in rows],
    ]
    table = "\n".join(lines)
    print(table)
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
        for name, marker in (("triton-http", "o"), ("in-process", "s")):
            sel = [r for r in rows if r[1] == name]
            left.plot([r[0] for r in sel], [r[2] for r in sel], marker=marker, label=name)
            right.plot([r[0] for r in sel], [r[4] for r in sel], marker=marker, label=name)
        left.set(xlabel="concurrency", ylabel="images / s", title="throughput", xticks=args.concurrency)
        right.set(xlabel="concurrency", ylabel="ms", title="p99 latency", xticks=args.concurrency)
        left.set_ylim(bottom=0)
        right.set_ylim(bottom=0)
        left.legend()
        fig.suptitle(f"{args.model} OS{args.output_stride} {args.size}x{args.size} uint8, {os.cpu_count()} CPUs")
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
    if args.results is not None:
        command = "python scripts/serve_load.py " + " ".join(sys.argv[1:])
        section = (f"\n## Serving under load (tritonserver, python backend) vs in-process\n\n{table}\n\n"
                   + (f"![throughput and p99 vs concurrency]({args.plot.name})\n\n" if args.plot else "")
                   + f"Reproduce: `{command}`\n")
        with open(args.results, "a", encoding="utf-8") as handle:
            handle.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

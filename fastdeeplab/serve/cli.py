"""``fastdeeplab serve``: run a real Triton Inference Server on a model repository, in the foreground.

It uses the ``tritonserver`` on PATH (NVIDIA's images), else fetches the one bundled in the ``nvidia-pytriton``
wheel into the cache once, builds the python backend's environment once (numpy<2, onnxruntime), loads every
model whose backend the server has, prints the endpoints and a client command, and serves until Ctrl-C or
SIGTERM, which stop the server and every process it started.

Examples::

    fastdeeplab deploy --out repo && fastdeeplab serve repo
    fastdeeplab serve repo --http-port 9000 --grpc-port 9001 --metrics-port 9002 --host 0.0.0.0
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from ..cli import float_in, input_dir, int_at_least

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "examples:" + __doc__.split("Examples::", 1)[1]
    parser.add_argument("repository", type=input_dir, metavar="REPO", help="model repository (fastdeeplab deploy)")
    parser.add_argument("--http-port", type=int_at_least(0), default=8000, help="default 8000; 0 picks a free one")
    parser.add_argument("--grpc-port", type=int_at_least(0), default=8001, help="default 8001; 0 picks a free one")
    parser.add_argument("--metrics-port", type=int_at_least(0), default=8002,
                        help="default 8002; 0 picks a free one")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for all)")
    parser.add_argument("--ready-timeout", type=float_in(0.0), default=300.0,
                        help="seconds to wait for the server and each model to load (default 300)")


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from .server import TritonServer

    def progress(message: str) -> None:
        print(f"fastdeeplab serve: {message}", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    server = TritonServer(args.repository, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, host=args.host, ready_timeout=args.ready_timeout,
                          progress=progress)
    try:
        server.start()
        for name, why in server.skipped.items():
            progress(f"skipped {name}: {why}")
        host = "localhost" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
        first = next(iter(server.models))
        print(f"serving {', '.join(f'{n} ({b})' for n, b in server.models.items())} from {args.repository}\n"
              f"  HTTP:    http://{server.http_url}\n  gRPC:    {server.grpc_url}\n  metrics: {server.metrics_url}\n"
              f"  try:     fastdeeplab client photo.jpg --url {host}:{server.http_port} --model {first} --out masks\n"
              f"Ctrl-C stops it.", flush=True)
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
        code = server.process.returncode if server.process is not None else 0
        raise RuntimeError(f"tritonserver exited on its own with code {code} (log: {server.log_path})")
    except KeyboardInterrupt:
        progress("stopping tritonserver")
        server.stop()
        progress("stopped")
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)

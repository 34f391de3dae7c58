"""``fastdeeplab client``: send photographs to a Triton Inference Server and write mask and overlay PNGs.

The server is one that serves a repository from ``fastdeeplab deploy`` (``fastdeeplab serve`` or NVIDIA's
images). Each photo goes as one request of raw uint8 RGB ``[1, 3, H, W]`` (normalised float32 when the model
takes float input), over HTTP or gRPC; the ``labels`` answer is written like ``fastdeeplab predict`` writes its
own (the same writer: ``<stem>_mask.png`` and ``<stem>_overlay.png``).

Examples::

    fastdeeplab client photo.jpg --url localhost:8000 --out masks
    fastdeeplab client a.jpg b.png --url localhost:8001 --protocol grpc --model deeplabv3_python --out masks
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TritonClient", "configure_parser", "run"]


def _tritonclient(protocol: str) -> Any:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except (ImportError, RuntimeError) as exc:  # tritonclient raises RuntimeError when an extra is missing
        raise ImportError(f"the {protocol} client needs tritonclient[{protocol}]: pip install "
                          f"'fastdeeplab[serve]' ({exc})") from None
    return module


class TritonClient:
    """A thin client for a served fastdeeplab model: ``labels(image)`` for an ``[H, W, 3]`` uint8 RGB array."""

    def __init__(self, url: str, *, protocol: str = "http", model: str | None = None, timeout: float = 120.0):
        if protocol not in ("http", "grpc"):
            raise ValueError(f"--protocol must be http or grpc, got {protocol!r}")
        self.protocol, self.timeout = protocol, timeout
        self.module = _tritonclient(protocol)
        url = url.split("://", 1)[-1].rstrip("/")
        if protocol == "http":
            self.client = self.module.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
        else:
            self.client = self.module.InferenceServerClient(url)
        try:
            live = self.client.is_server_live()
        except Exception as exc:  # noqa: BLE001 - connection refused, DNS, protocol mismatch
            raise ConnectionError(f"--url {url}: no Triton server answers over {protocol} ({exc}); is "
                                  f"`fastdeeplab serve` running, and is this its {protocol} port?") from None
        if not live:
            raise ConnectionError(f"--url {url}: the Triton server is not live")
        self.model = model or self._only_ready_model()
        metadata = self.client.get_model_metadata(self.model)
        if protocol == "grpc":
            from google.protobuf import json_format

            metadata = json_format.MessageToDict(metadata, preserving_proto_field_name=True)
        self.input_name = metadata["inputs"][0]["name"]
        self.input_type = metadata["inputs"][0]["datatype"]
        outputs = [o["name"] for o in metadata["outputs"]]
        if "labels" not in outputs:
            raise ValueError(f"model {self.model!r} has no 'labels' output (outputs: {outputs}); deploy it with "
                             "the default argmax")

    def _only_ready_model(self) -> str:
        index = self.client.get_model_repository_index()
        if self.protocol == "grpc":
            from google.protobuf import json_format

            index = json_format.MessageToDict(index, preserving_proto_field_name=True).get("models", [])
        ready = [m["name"] for m in index if m.get("state") == "READY"]
        if len(ready) != 1:
            raise ValueError(f"the server has {len(ready)} ready models ({', '.join(ready) or 'none'}); "
                             "pick one with --model")
        return ready[0]

    def labels(self, image: np.ndarray) -> np.ndarray:
        """Class map ``[H, W]`` of one RGB photo ``[H, W, 3]`` uint8."""
        pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)[None])
        if self.input_type == "FP32":
            from ..images import normalize

            pixels = normalize(image)[None].numpy().astype(np.float32)
        elif self.input_type != "UINT8":
            raise ValueError(f"model {self.model!r} takes {self.input_type} input; this client sends UINT8 or FP32")
        tensor = self.module.InferInput(self.input_name, list(pixels.shape), self.input_type)
        tensor.set_data_from_numpy(pixels)
        wanted = [self.module.InferRequestedOutput("labels")]
        if self.protocol == "grpc":
            result = self.client.infer(self.model, [tensor], outputs=wanted, client_timeout=self.timeout)
        else:
            result = self.client.infer(self.model, [tensor], outputs=wanted)
        return result.as_numpy("labels")[0]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fastdeeplab client`` (nothing heavy is imported here)."""
    from ..cli import float_in, input_file

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "examples:" + __doc__.split("Examples::", 1)[1]
    parser.add_argument("images", nargs="+", type=input_file, metavar="IMAGE", help="photographs to segment")
    parser.add_argument("--url", default=None,
                        help="the server's host:port (default localhost:8000 for http, localhost:8001 for grpc)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http", help="default: http")
    parser.add_argument("--model", default=None, help="model name (default: the server's only ready model)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--palette", choices=("cityscapes", "voc"), default="voc", help="class colours (default voc)")
    parser.add_argument("--alpha", type=float_in(0.0, 1.0, low_open=False), default=0.5,
                        help="opacity of the class colours in the overlay, in [0, 1] (default 0.5)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files in --out that fastdeeplab did not write (never one of the inputs)")
    parser.add_argument("--timeout", type=float_in(0.0), default=120.0, help="seconds per request (default 120)")


def run(args: argparse.Namespace) -> int:
    from ..images import load_image
    from ..predict import PALETTES, check_images, check_outputs, write_prediction

    paths = [Path(p) for p in args.images]
    check_outputs(args.out, check_images(paths), paths, overwrite=args.overwrite)
    url = args.url or ("localhost:8001" if args.protocol == "grpc" else "localhost:8000")
    client = TritonClient(url, protocol=args.protocol, model=args.model, timeout=args.timeout)
    for path in paths:
        image = load_image(path)
        try:
            mask = client.labels(np.asarray(image))
        except Exception as exc:  # noqa: BLE001 - the server's error response, one line
            raise RuntimeError(f"{path}: the server answered with an error: {exc}") from None
        mask_path, overlay_path = write_prediction(args.out, path.stem, image, mask, PALETTES[args.palette],
                                                   alpha=args.alpha)
        print(f"{path} -> {mask_path}, {overlay_path}")
    return 0


def segment_paths(paths: Sequence[str], url: str, **kwargs: Any) -> list[np.ndarray]:
    """Class maps of image files through a served model (a convenience over :class:`TritonClient`)."""
    from ..images import load_image

    client = TritonClient(url, **kwargs)
    return [client.labels(np.asarray(load_image(p))) for p in paths]

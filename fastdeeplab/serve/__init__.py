"""Serving: a real Triton Inference Server on a repository that ``fastdeeplab deploy`` wrote, and a client.

* :mod:`fastdeeplab.serve.server`: :class:`TritonServer` finds or fetches ``tritonserver``, builds the python
  backend's environment, loads the models and stops every process it started (``fastdeeplab serve``).
* :mod:`fastdeeplab.export.triton_model` (below serve, as ``deploy`` writes it): the python-backend ``model.py``.
* :mod:`fastdeeplab.serve.client`: send photos over HTTP or gRPC, get class maps (``fastdeeplab client``).

Nothing here is imported by ``import fastdeeplab``; the client needs ``pip install 'fastdeeplab[serve]'``.
"""

from __future__ import annotations

from .server import TritonServer, find_tritonserver, free_port

__all__ = ["TritonServer", "find_tritonserver", "free_port"]

"""Shared fixtures. Seeding and device selection live here.

Triton kernels run under the Triton interpreter on machines without a GPU: ``TRITON_INTERPRET=1`` must be
set before triton is first imported, so it is set here, at collection time, before any test module loads.
"""

from __future__ import annotations

import os
import shutil

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine, spinning threads of one
# process starve the others (tiny-input passes ran up to 10x slower). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def triton_device() -> torch.device:
    """Where Triton kernels run: CUDA when present, else CPU tensors under TRITON_INTERPRET=1."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

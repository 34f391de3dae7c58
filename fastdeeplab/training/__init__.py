"""Training: the paper's two-stage protocol, torchrun-ready (``fastdeeplab.train`` is the function)."""

from __future__ import annotations

from .core import *  # noqa: F401,F403
from .core import __all__  # noqa: F401

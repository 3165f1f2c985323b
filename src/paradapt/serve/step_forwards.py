"""Instance ``forward``s installed on some of the served model's modules for one engine step.

The engine swaps a few modules' computations for faster equivalents (the LM head's prepacked
product, serve/lm_head.py; the linear layers' few-rows kernel, serve/layer_gemm.py). Each is set as an instance attribute for the duration of a step only:
``nn.Module.__call__`` runs it with the module's hooks (so adapters still attach), and outside
the engine's steps the model is exactly the model the user gave.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from torch import nn


@contextlib.contextmanager
def installed(forwards: Sequence[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Each ``(module, forward)`` pair's forward inside this block; removed after, errors included."""
    try:
        for module, forward in forwards:
            module.forward = forward
        yield
    finally:
        for module, _ in forwards:
            module.__dict__.pop("forward", None)


__all__ = ["installed"]

"""Elementwise scale and shift: (IA)^3 and SSF.

``h <- h * g + b``, written as a delta ``h * (g - 1) + b`` so that it composes
like every other adapter (``h <- h + delta``).

- (IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better
  and Cheaper than In-Context Learning"): scale only, on keys, values and the
  FFN's intermediate activation (the input of its down projection).
- SSF (Lian et al. 2022, "Scaling & Shifting Your Features"): scale and shift of
  linear outputs.

Both are linear in ``h`` and merge into the adjacent linear's weight (and bias).
"""

from __future__ import annotations

import torch
from torch import nn


class ScaleShift(nn.Module):
    """A learned per-channel scale (and optional shift) of the tensor it reads."""

    def __init__(self, dim: int, shift: bool = False, reads: str = "output", writes: str = "output"):
        super().__init__()
        self.dim = dim
        self.reads, self.writes = reads, writes
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim)) if shift else None

    def delta(self, src: torch.Tensor) -> torch.Tensor:
        out = src * (self.scale - 1.0)
        return out + self.shift if self.shift is not None else out

    @property
    def mergeable(self) -> bool:
        return self.reads == self.writes

    def extra_repr(self) -> str:
        return f"dim={self.dim}, shift={self.shift is not None}, on={self.reads}"


@torch.no_grad()
def init_scale_shift(m: ScaleShift, scheme: str = "default") -> None:
    """``default``: g = 1, b = 0 (an exact no-op). ``random``: perturbed, for tests."""
    if scheme == "default":
        nn.init.ones_(m.scale)
        if m.shift is not None:
            nn.init.zeros_(m.shift)
    elif scheme == "random":
        nn.init.normal_(m.scale, mean=1.0, std=0.2)
        if m.shift is not None:
            nn.init.normal_(m.shift, std=0.1)
    else:
        raise ValueError(f"unknown scale_shift init {scheme!r}")

"""The bottleneck: parallel adapters, series adapters and LoRA are all this one module.

``delta(x) = s * act(x Wd^T + bd) Wu^T + bu``

- parallel adapter (He et al. 2022; AdaptFormer, Chen et al. 2022): ``x`` is the
  block's input, the delta is added to the block's output;
- series adapter (Houlsby et al. 2019; Pfeiffer et al. 2021): ``x`` is the
  block's output ``h`` itself, so ``h <- h + f(h)``;
- LoRA (Hu et al. 2021): act = identity, no biases, ``s = alpha / r``, placed
  beside one linear. Because it is linear it merges into that weight.

Weights use ``nn.Linear`` layout (``down.weight: [r, d_in]``, ``up.weight:
[d_out, r]``), the same as PEFT's ``lora_A`` / ``lora_B``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_ACTS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "identity": lambda t: t,
}


class _Uninitialised(nn.Linear):
    def reset_parameters(self) -> None:
        pass


def _linear(d_in: int, d_out: int, bias: bool, initialise: bool) -> nn.Linear:
    """``nn.Linear``, without its random init for a load whose file sets every weight (that init
    was a third of the time to read a 56-site LoRA folder; ``torch.nn.utils.skip_init`` costs
    more than the init). A new adapter keeps the init, so seeded runs draw the same weights."""
    if initialise:
        return nn.Linear(d_in, d_out, bias=bias)
    lin = _Uninitialised(d_in, d_out, bias=bias)
    lin.__class__ = nn.Linear  # a plain Linear from here on (repr, reset_parameters)
    return lin


class Bottleneck(nn.Module):
    """Down-project, activate, up-project, scale: the shared adapter primitive."""

    mergeable_kinds = ("identity",)

    def __init__(
        self,
        d_in: int,
        d_out: int,
        r: int,
        act: str = "relu",
        scale: float | str = 1.0,
        bias: bool = True,
        dropout: float = 0.0,
        reads: str = "input",
        writes: str = "output",
        initialise: bool = True,
    ):
        super().__init__()
        self.d_in, self.d_out, self.r = d_in, d_out, r
        self.act_name = act
        self.reads, self.writes = reads, writes
        self.down = _linear(d_in, r, bias, initialise)
        self.up = _linear(r, d_out, bias, initialise)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if scale == "learned":
            self.scale = nn.Parameter(torch.ones(()))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)), persistent=False)
        self.learned_scale = scale == "learned"

    def delta(self, src: torch.Tensor) -> torch.Tensor:
        """The amount added at the site, from the tensor this component reads."""
        src = src.to(self.down.weight.dtype)
        a = _ACTS[self.act_name](F.linear(self.dropout(src), self.down.weight, self.down.bias))
        out = F.linear(a, self.up.weight) * self.scale.to(a.dtype)
        return out + self.up.bias if self.up.bias is not None else out

    # -- merge ----------------------------------------------------------------
    @property
    def mergeable(self) -> bool:
        return self.act_name == "identity" and self.reads == "input" and self.writes == "output"

    def merged_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(dW, db)`` such that ``W x + b + delta(x) == (W + dW) x + (b + db)``."""
        s = self.scale.detach()
        dw = (self.up.weight @ self.down.weight) * s
        db = None
        if self.down.bias is not None:
            db = self.up.weight @ self.down.bias * s
        if self.up.bias is not None:
            db = self.up.bias if db is None else db + self.up.bias
        return dw, db

    def extra_repr(self) -> str:
        return f"{self.d_in} -> {self.r} -> {self.d_out}, act={self.act_name}, reads={self.reads}"


# -- init helpers ---------------------------------------------------------------


@torch.no_grad()
def init_bottleneck(m: Bottleneck, scheme: str = "default", base_weight: torch.Tensor | None = None) -> None:
    """Initialise a bottleneck so that, by default, it starts as an exact no-op.

    - ``default`` ("mam_adapter" in AdapterHub, "lora" in He et al.'s code, LoRA's own):
      Kaiming-uniform(a=sqrt 5) down, zero up, zero biases.
    - ``bert``: normal(0, 0.02) down, zero up and biases (still a no-op).
    - ``gaussian`` (LoRA): normal(0, 1/r) down, zero up.
    - ``pissa`` (LoRA): down/up from the top-r singular triplets of the base weight;
      the caller subtracts them from the base (see ``sites.LinearSite``).
    - ``loftq`` (LoRA): down/up from the top-r singular triplets of ``base_weight``, here the
      base's quantisation error ``W - Q(W)`` (the caller's): the adapter starts as the best
      rank-r correction of the quantised base.
    - ``random``: non-zero everywhere, for tests that must see an effect.
    """
    if scheme in ("default", "kaiming"):
        nn.init.kaiming_uniform_(m.down.weight, a=math.sqrt(5))
        nn.init.zeros_(m.up.weight)
    elif scheme == "bert":
        nn.init.normal_(m.down.weight, std=0.02)
        nn.init.zeros_(m.up.weight)
    elif scheme == "gaussian":
        nn.init.normal_(m.down.weight, std=1.0 / m.r)
        nn.init.zeros_(m.up.weight)
    elif scheme in ("pissa", "loftq"):
        if base_weight is None:
            raise ValueError(f"{scheme} init needs the base weight")
        u, s, vh = torch.linalg.svd(base_weight.float(), full_matrices=False)
        root = s[: m.r].sqrt() / math.sqrt(float(m.scale))
        m.down.weight.copy_((root[:, None] * vh[: m.r]).to(m.down.weight.dtype))
        m.up.weight.copy_((u[:, : m.r] * root[None, :]).to(m.up.weight.dtype))
    elif scheme == "random":
        nn.init.kaiming_uniform_(m.down.weight, a=math.sqrt(5))
        nn.init.normal_(m.up.weight, std=0.5 / math.sqrt(m.r))
    else:
        raise ValueError(f"unknown bottleneck init {scheme!r}")
    for b in (m.down.bias, m.up.bias):
        if b is not None:
            if scheme == "random":
                nn.init.normal_(b, std=0.02)
            else:
                nn.init.zeros_(b)

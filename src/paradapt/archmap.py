"""Where the blocks and linears are, per model family, by module names only.

No modeling code is copied: a family is a handful of relative module paths
inside one transformer layer. Families are recognised by structure (which
submodules a layer has), not by ``model_type``, so Qwen2, Mistral and other
Llama-shaped models need no entry of their own. Models that match no family
still work with explicit module-name patterns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """Relative module paths inside one layer."""

    name: str
    ffn: tuple[str, str]  # (entry: reads the FFN block input, exit: output before residual/norm)
    attn: tuple[str, str]  # same for the attention block
    attention: str  # the self-attention module whose attention function prefixes hook
    lora_default: tuple[str, ...]
    ia3_out: tuple[str, ...]
    ia3_in: tuple[str, ...]
    ffn_in: tuple[str, ...]  # the FFN's first projection(s) (gate and up for gated FFNs)
    ffn_out: str  # the FFN's last projection
    ffn_act: str  # the FFN's activation attribute (applied to the first projection, the gate if gated)


FAMILIES = (
    Family(
        "llama",
        ffn=("mlp", "mlp"),
        attn=("self_attn", "self_attn"),
        attention="self_attn",
        lora_default=("self_attn.q_proj", "self_attn.v_proj"),
        ia3_out=("self_attn.k_proj", "self_attn.v_proj"),
        ia3_in=("mlp.down_proj",),
        ffn_in=("mlp.gate_proj", "mlp.up_proj"),
        ffn_out="mlp.down_proj",
        ffn_act="mlp.act_fn",
    ),
    Family(
        "gpt2",
        ffn=("mlp", "mlp"),
        attn=("attn", "attn"),
        attention="attn",
        lora_default=("attn.c_attn",),
        ia3_out=("attn.c_attn",),
        ia3_in=("mlp.c_proj",),
        ffn_in=("mlp.c_fc",),
        ffn_out="mlp.c_proj",
        ffn_act="mlp.act",
    ),
    Family(
        "bert",
        ffn=("intermediate", "output.dense"),
        attn=("attention.self", "attention.output.dense"),
        attention="attention.self",
        lora_default=("attention.self.query", "attention.self.value"),
        ia3_out=("attention.self.key", "attention.self.value"),
        ia3_in=("output.dense",),
        ffn_in=("intermediate.dense",),
        ffn_out="output.dense",
        ffn_act="intermediate.intermediate_act_fn",
    ),
)


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (same math, transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


@dataclass
class ArchMap:
    """The layers of one model and the family their insides follow (None if unknown)."""

    family: Family | None
    layers: list[str]  # full names of the transformer layers, in order

    def layer_index(self, name: str) -> int | None:
        """The index of the layer a module belongs to, or None."""
        for i, layer in enumerate(self.layers):
            if name == layer or name.startswith(layer + "."):
                return i
        return None


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _family_of(layer: nn.Module) -> Family | None:
    for fam in FAMILIES:
        paths = {*fam.ffn, *fam.attn, fam.attention, *fam.lora_default, *fam.ffn_in, fam.ffn_out}
        if all(_has(layer, p) for p in paths):
            return fam
    return None


def detect(modules: dict[str, nn.Module]) -> ArchMap:
    """Find the transformer layers (the longest ``ModuleList`` of same-typed blocks) and their family."""
    best: tuple[int, str] | None = None
    for name, mod in modules.items():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if len({type(m) for m in mod}) == 1 and (best is None or len(mod) > best[0]):
                best = (len(mod), name)
    if best is None:
        return ArchMap(None, [])
    prefix = best[1]
    layers = [f"{prefix}.{i}" if prefix else str(i) for i in range(best[0])]
    return ArchMap(_family_of(modules[layers[0]]), layers)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight  # Conv1D stores [d_in, d_out]
    return w.shape[0], w.shape[1]


def weight_out_in(module: nn.Module):
    """The weight as a ``[d_out, d_in]`` view (shares storage: in-place edits change the module)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


def match_suffixes(names: list[str], suffixes: tuple[str, ...] | list[str]) -> list[str]:
    """Names equal to a suffix or ending with ``.suffix`` (PEFT's list semantics)."""
    return [n for n in names if any(n == s or n.endswith("." + s) for s in suffixes)]


def match_regex(names: list[str], pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return [n for n in names if rx.fullmatch(n)]

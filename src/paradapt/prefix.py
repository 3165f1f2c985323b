"""Prefix tuning: learned keys and values in every self-attention.

Li & Liang 2021, "Prefix-Tuning": each layer's attention sees ``P`` extra
key/value pairs ``[P_k; K], [P_v; V]`` (joint softmax). He et al. 2022 show this
equals a gated *parallel* attention adapter:
``(1 - lambda(x)) Attn(x) + lambda(x) softmax(q P_k^T) P_v``.

``gated=True`` makes that gate explicit and learned, with a separate softmax
over the prefix (LLaMA-Adapter, Zhang et al. 2023):
``out + tanh(g) * softmax(q P_k^T * scale) P_v``. With ``g = 0`` it is an exact
no-op, which the joint form can never be.

Prefix keys are used as given (no rotary embedding), as in PEFT; they never
enter the KV cache, so generation and positions are unaffected. Under packed
(continuous-batching) routes each request's prefix columns are visible only to
its own tokens. This module holds the prefix's weights; ``prefix_attention.py``
puts them into the attention.
"""

from __future__ import annotations

import torch
from torch import nn


class PrefixEncoder(nn.Module):
    """Li & Liang's reparameterisation: ``E [P, d] -> tanh(E W1 + b1) W2 + b2 -> all layers' P_k, P_v``.

    Training through this MLP is more stable than training the prefix directly;
    ``fold`` replaces it by the plain per-layer tensors it produces.
    """

    def __init__(self, num_tokens: int, d_model: int, hidden: int, layers: int, kv_dim: int):
        super().__init__()
        self.layers, self.kv_dim = layers, kv_dim
        self.embedding = nn.Parameter(torch.empty(num_tokens, d_model))
        self.mlp = nn.Sequential(
            nn.Linear(d_model, hidden), nn.Tanh(), nn.Linear(hidden, layers * 2 * kv_dim)
        )

    def layer_kv(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer, computing only that layer's slice of the last matmul."""
        h = self.mlp[1](self.mlp[0](self.embedding))
        w, b = self.mlp[2].weight, self.mlp[2].bias
        lo = index * 2 * self.kv_dim
        kv = nn.functional.linear(h, w[lo : lo + 2 * self.kv_dim], b[lo : lo + 2 * self.kv_dim])
        return kv[:, : self.kv_dim], kv[:, self.kv_dim :]


class Prefix(nn.Module):
    """One layer's prefix: ``P`` keys and values of width ``n_kv_heads * head_dim``."""

    reads = "attention"
    writes = "attention"
    mergeable = False

    def __init__(self, num_tokens: int, n_heads: int, n_kv_heads: int, head_dim: int, gated: bool = False):
        super().__init__()
        self.num_tokens, self.n_heads, self.n_kv_heads, self.head_dim = (
            num_tokens,
            n_heads,
            n_kv_heads,
            head_dim,
        )
        kv_dim = n_kv_heads * head_dim
        self.key = nn.Parameter(torch.zeros(num_tokens, kv_dim))
        self.value = nn.Parameter(torch.zeros(num_tokens, kv_dim))
        self.gate = nn.Parameter(torch.zeros(n_heads)) if gated else None
        self.encoder: PrefixEncoder | None = None  # set by attach_encoder, not registered here
        self.layer_index = 0

    def attach_encoder(self, encoder: PrefixEncoder, layer_index: int) -> None:
        """Produce this layer's prefix from a shared encoder (owned by the adapter) until folded."""
        self.__dict__["encoder"] = encoder  # a reference, so the encoder's weights are owned once
        self.layer_index = layer_index
        del self.key, self.value
        self.key = self.value = None

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_k, P_v)`` as ``[n_kv_heads, P, head_dim]`` each."""
        if self.encoder is not None:
            k, v = self.encoder.layer_kv(self.layer_index)
        else:
            k, v = self.key, self.value
        shape = (self.num_tokens, self.n_kv_heads, self.head_dim)
        return k.view(shape).transpose(0, 1), v.view(shape).transpose(0, 1)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the encoder reference by the plain tensors it produces now."""
        if self.encoder is None:
            return
        trainable = (
            self.encoder.embedding.requires_grad
        )  # keep the adapter's trainability (no_grad hides it in k)
        k, v = self.encoder.layer_kv(self.layer_index)
        self.__dict__["encoder"] = None
        self.key = nn.Parameter(k.detach().clone(), requires_grad=trainable)
        self.value = nn.Parameter(v.detach().clone(), requires_grad=trainable)

    def extra_repr(self) -> str:
        return f"tokens={self.num_tokens}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, gated={self.gate is not None}"


@torch.no_grad()
def init_prefix(m: Prefix, scheme: str = "default") -> None:
    """Small random prefixes (a prefix of zeros is a degenerate start); gate at zero."""
    if m.key is not None:
        nn.init.normal_(m.key, std=0.02 if scheme == "default" else 0.5)
        nn.init.normal_(m.value, std=0.02 if scheme == "default" else 0.5)
    if m.gate is not None:
        if scheme == "random":
            nn.init.normal_(m.gate, std=0.5)
        else:
            nn.init.zeros_(m.gate)


@torch.no_grad()
def init_prefix_encoder(enc: PrefixEncoder, scheme: str = "default") -> None:
    nn.init.normal_(enc.embedding, std=1.0)
    for lin in (enc.mlp[0], enc.mlp[2]):
        nn.init.normal_(lin.weight, std=(0.5 if scheme == "random" else 0.02) / lin.in_features**0.5)
        nn.init.zeros_(lin.bias)

"""Shared fixtures: tiny random models of each family, built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Tiny models: one thread avoids oversubscription stalls on a busy 2-core machine (250 ms vs 1 ms per forward).
torch.set_num_threads(1)  # applies to every test module (conftest is imported first)

FAMILIES = ["llama", "qwen2", "gpt2", "bert"]
ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "assets")


# Llama and Qwen2 share one shape: GQA with 4 query and 2 key/value heads.
_DECODER = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_model(family: str, attn: str = "sdpa", seed: int = 0, **config) -> torch.nn.Module:
    """A 2-layer random model of ``family`` in eval mode; ``config`` overrides config fields."""
    torch.manual_seed(seed)
    if family == "llama":
        m = LlamaForCausalLM(LlamaConfig(**{**_DECODER, **config}))
    elif family == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**{**_DECODER, **config}))
    elif family == "gpt2":
        cfg = GPT2Config(
            vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        cfg.update(config)
        m = GPT2LMHeadModel(cfg)
    elif family == "bert":
        cfg = BertConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            **config,
        )
        m = BertModel(cfg)
    else:
        raise ValueError(family)
    m.config._attn_implementation = attn
    return m.eval()


def outputs(model, ids, **kw) -> torch.Tensor:
    out = model(ids, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param

"""Shared fixtures: tiny random models of each family, built from configs (no downloads); the
shared assets folder, found as the package finds it; missing assets and the skip summary.

A test that needs a shared asset (the stories260K model, the SST-2 / AG News data) asks for it
with :func:`require_asset` (in a fixture or test) or the :func:`needs_asset` mark. Without the
asset it is skipped on a developer machine, but with ``CI=true`` it fails: CI must not pass by
silently skipping the tests it could not run. The run ends with one line counting the skipped
tests by reason.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

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

from paradapt.errors import SetupError  # noqa: E402
from paradapt.loading import find_assets  # noqa: E402

FAMILIES = ["llama", "qwen2", "gpt2", "bert"]
#: A chat template for tokenizers without one (stories260K's): the server refuses chat without one.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")

try:  # $PARADAPT_ASSETS, else shared/assets walking up from the current folder and from the package
    ASSETS: Path | None = find_assets()
    ASSETS_PROBLEM = "no shared assets folder found (set PARADAPT_ASSETS)"
except SetupError as e:  # PARADAPT_ASSETS names no folder: every asset test says so
    ASSETS, ASSETS_PROBLEM = None, str(e)


# -- shared assets ---------------------------------------------------------------------------------


def asset_path(*parts: str) -> Path:
    """Where an asset of the shared assets folder is (``asset_path("models", "stories260k-hf")``);
    it may not exist: :func:`require_asset` checks."""
    return (ASSETS if ASSETS is not None else Path("<no shared assets folder>")).joinpath(*parts)


def require_asset(path: Path, what: str | None = None) -> Path:
    """``path`` if it exists; else skip the test, or fail it when ``CI=true``."""
    if not Path(path).exists():
        where = ASSETS_PROBLEM if ASSETS is None else f"not found at {path}"
        reason = f"shared asset {what or Path(path).name} missing: {where}"
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: a missing asset is a failure)", pytrace=False)
        pytest.skip(reason)
    return Path(path)


def needs_asset(*parts: str) -> pytest.MarkDecorator:
    """Mark a test (or module, as ``pytestmark``) that needs ``asset_path(*parts)``."""
    return pytest.mark.needs_asset(*parts)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_asset(*parts): needs this shared asset (skip; fail in CI)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs_asset"):
        require_asset(asset_path(*mark.args), "/".join(mark.args))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """One line: how many tests were skipped, by reason (a skip should never go unnoticed)."""
    reasons: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        parts = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common())
        terminalreporter.write_line(f"skipped {sum(reasons.values())}: {parts}")


# -- tiny models -----------------------------------------------------------------------------------


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

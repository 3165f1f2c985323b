"""The training loop on tiny models: learning happens, mixed runs equal separate runs, resume is exact."""

from __future__ import annotations

import copy

import torch
from conftest import tiny_model

import paradapt as pa
from paradapt.train.data import TokenizedDataset
from paradapt.train.loop import Task, TrainArgs, Trainer, lr_factor


def cls_data(n: int, seed: int, flip: bool = False) -> TokenizedDataset:
    """Label = whether token 7 appears: learnable by a head on a frozen random encoder."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        ids = torch.randint(10, 96, (8,), generator=g).tolist()
        y = int(torch.rand((), generator=g) < 0.5)
        if y:
            ids[3] = 7
        examples.append({"input_ids": ids, "attention_mask": [1] * 8, "labels": y ^ flip})
    return TokenizedDataset(examples, task="classification", pad_id=0)


def lm_data(n: int, seed: int) -> TokenizedDataset:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(1, 96, (6,), generator=g).tolist()
    examples = [{"input_ids": base * 2, "attention_mask": [1] * 12, "labels": base * 2} for _ in range(n)]
    return TokenizedDataset(examples, task="lm", pad_id=0)


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert lr_factor(0, 4, 20, "cosine") == 0.25 and lr_factor(3, 4, 20, "cosine") == 1.0
    assert abs(lr_factor(20, 4, 20, "cosine")) < 1e-12 and lr_factor(15, 4, 20, "constant") == 1.0


def test_classification_adapter_learns():
    model = tiny_model("bert")
    pa.add_adapter(model, "a", pa.ParallelConfig(r=8, head={"num_labels": 2, "dropout": 0.0}))
    args = TrainArgs(max_steps=100, batch_size=16, lr=1e-2, log_every=20, seed=0)
    tr = Trainer(model, [Task("a", cls_data(256, 0), cls_data(64, 1))], args)
    before = tr.evaluate()["a"]["accuracy"]
    tr.train(progress=False)
    after = tr.history[-1]["eval"]["a"]["accuracy"]
    assert after > max(before, 0.8), (before, after)


def test_classification_head_on_a_causal_lm_trains():
    """A head on a decoder with an LM head reads its final hidden states (it has no last_hidden_state)."""
    model = tiny_model("llama")
    pa.add_adapter(model, "a", pa.ParallelConfig(r=8, head={"num_labels": 2, "dropout": 0.0}))
    args = TrainArgs(max_steps=3, batch_size=8, lr=1e-2, log_every=1, seed=0)
    tr = Trainer(model, [Task("a", cls_data(32, 0), cls_data(16, 1))], args)
    tr.train(progress=False)
    assert "accuracy" in tr.history[-1]["eval"]["a"]
    losses = [r["loss"]["a"] for r in tr.history if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in losses)


def test_two_adapters_in_one_run_match_two_separate_runs():
    """One mixed forward per step gives each adapter the gradient of its own run."""
    base = tiny_model("llama")
    args = TrainArgs(max_steps=5, batch_size=4, lr=1e-2, log_every=1, max_grad_norm=None)

    def fresh(names):
        m = copy.deepcopy(base)
        for n in names:
            torch.manual_seed(hash(n) % 1000)
            pa.add_adapter(m, n, pa.LoRAConfig(r=4, init="random"))
        return m

    data = {"a": lm_data(8, 0), "b": lm_data(8, 1)}
    both = fresh(["a", "b"])
    Trainer(both, [Task(n, data[n]) for n in "ab"], args).train(progress=False)
    for n in "ab":
        alone = fresh([n])
        Trainer(alone, [Task(n, data[n])], TrainArgs(**{**args.__dict__, "batch_size": 2})).train(
            progress=False
        )
        for (k, p), q in zip(
            both.paradapt[n].state_dict().items(), alone.paradapt[n].state_dict().values(), strict=True
        ):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=k)


def test_resume_continues_the_same_loss_curve(tmp_path):
    def run(stop_at=None, state=None):
        torch.manual_seed(0)
        m = tiny_model("llama")
        pa.add_adapter(m, "a", pa.LoRAConfig(r=4, init="random"))
        args = TrainArgs(max_steps=8, batch_size=4, log_every=1, warmup_steps=2)
        tr = Trainer(m, [Task("a", lm_data(12, 0))], args)
        if state is not None:
            tr.load_state_dict(state)
        tr.train(progress=False, stop_at=stop_at)
        return tr

    full = run()
    half = run(stop_at=4)  # an interrupted run
    path = tmp_path / "ckpt.pt"
    torch.save(half.state_dict(), path)
    resumed = run(state=torch.load(path, weights_only=False))
    want = [h["loss"]["a"] for h in full.history if "loss" in h][4:]
    got = [h["loss"]["a"] for h in resumed.history if "loss" in h]
    assert got == want


def _record_requires_grad(graph: dict, i: int):
    def hook(_module, _args, out):
        graph[i] = (out[0] if isinstance(out, tuple) else out).requires_grad

    return hook


def test_adapters_on_top_layers_stop_the_backward_there():
    """``layers=[1]`` (AdapterDrop-style): layer 0 keeps no graph, so it runs no backward and
    stores no activations; only the adapter and its head get gradients."""
    for ckpt in (False, True):
        model = tiny_model("bert")
        head = {"num_labels": 2, "dropout": 0.0}
        pa.add_adapter(model, "a", pa.ParallelConfig(r=4, head=head, layers=[1], init="random"))
        graph = {}
        for i, layer in enumerate(model.encoder.layer):
            layer.register_forward_hook(_record_requires_grad(graph, i))
        args = TrainArgs(max_steps=2, batch_size=8, gradient_checkpointing=ckpt, max_grad_norm=None)
        tr = Trainer(model, [Task("a", cls_data(16, 0))], args)
        tr.train_step()
        assert graph == {0: False, 1: True}, (ckpt, graph)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        tr.train_step()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and all(n.startswith("paradapt.") for n in changed), changed
        assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("paradapt."))

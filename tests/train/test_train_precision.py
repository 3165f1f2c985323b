"""bf16 autocast and gradient checkpointing in the training loop (tiny models)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from test_train_loop import cls_data, lm_data

import paradapt as pa
from paradapt.train.loop import Task, TrainArgs, Trainer


def test_bf16_run_trains_and_keeps_adapter_params_fp32():
    model = tiny_model("bert")
    pa.add_adapter(model, "a", pa.ParallelConfig(r=8, head={"num_labels": 2, "dropout": 0.0}))
    args = TrainArgs(max_steps=60, batch_size=16, lr=1e-2, log_every=1, bf16=True)
    tr = Trainer(model, [Task("a", cls_data(256, 0), cls_data(64, 1))], args)
    seen = []
    linear = model.encoder.layer[0].intermediate.dense
    handle = linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    tr.train(progress=False)
    handle.remove()
    assert seen[0] == torch.bfloat16  # the base's matmuls really ran in bf16
    curve = [h["loss"]["a"] for h in tr.history if "loss" in h]
    assert sum(curve[-10:]) / 10 < 0.8 * sum(curve[:10]) / 10, curve
    assert tr.history[-1]["eval"]["a"]["accuracy"] > 0.75
    params = [p for p in model.paradapt["a"].parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    states = [s for s in tr.opts["a"].state.values()]
    assert all(s["exp_avg"].dtype == torch.float32 for s in states)


def grads(model, task: Task, checkpointing: bool, monkeypatch) -> dict[str, torch.Tensor]:
    """Adapter gradients of one batch, with or without gradient checkpointing."""
    args = TrainArgs(max_steps=1, batch_size=4, gradient_checkpointing=checkpointing)
    tr = Trainer(model, [task], args)
    model.train()
    tr._accumulate()  # the first step also checks the LM head once (lm_loss.head_checks): count the next
    model.zero_grad(set_to_none=True)
    inner = model.model.layers[0].mlp if hasattr(model, "model") else model.encoder.layer[0].output
    calls, forward = [], type(inner).forward  # (module hooks do not fire in a checkpoint's recompute)
    monkeypatch.setattr(
        type(inner), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k)
    )
    torch.manual_seed(0)  # the same dropout masks in both runs
    tr._accumulate()
    monkeypatch.undo()
    assert len(calls) == (4 if checkpointing else 2)  # 2 layers, each recomputed in backward
    return {n: p.grad.clone() for n, p in model.paradapt[task.name].named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "family, config, data",
    [
        ("llama", lambda: pa.LoRAConfig(r=4, init="random"), lambda: lm_data(8, 0)),
        ("llama", lambda: pa.ParallelConfig(r=4, init="random"), lambda: lm_data(8, 0)),
        ("llama", lambda: pa.PrefixConfig(num_virtual_tokens=3), lambda: lm_data(8, 0)),
        (
            "bert",
            lambda: pa.SeriesConfig(r=4, init="random", head={"num_labels": 2, "dropout": 0.0}),
            lambda: cls_data(8, 0),
        ),
    ],
)
def test_gradient_checkpointing_gives_the_same_gradients(family, config, data, monkeypatch):
    base = tiny_model(family)
    pa.add_adapter(base, "a", config())
    task = Task("a", data())
    plain = grads(copy.deepcopy(base), task, False, monkeypatch)
    ckpt = grads(copy.deepcopy(base), task, True, monkeypatch)
    assert plain.keys() == ckpt.keys() and plain
    for k in plain:
        assert plain[k].abs().sum() > 0, k
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-5, msg=k)

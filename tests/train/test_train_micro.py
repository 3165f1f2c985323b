"""Length-bucketed micro-batches: the joint step's rows split by length give the one-forward gradient."""

from __future__ import annotations

import copy
import itertools
import random
import re

import pytest
import torch
from conftest import tiny_model

import paradapt as pa
from paradapt.errors import ConfigError
from paradapt.train import loop
from paradapt.train.config import validate
from paradapt.train.data import TokenizedDataset, length_buckets
from paradapt.train.loop import Task, TrainArgs, Trainer

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def padded(lengths: list[int], groups: list[list[int]]) -> int:
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def best_padding(lengths: list[int], parts: int) -> int:
    """Brute force over every assignment of rows to ``parts`` non-empty groups."""
    best = None
    for labels in itertools.product(range(parts), repeat=len(lengths)):
        groups = [[i for i, g in enumerate(labels) if g == k] for k in range(parts)]
        if all(groups):
            cost = padded(lengths, groups)
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_length_buckets_pad_least_of_all_groupings(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 20) for _ in range(7)]
    for parts in (1, 2, 3):
        groups = length_buckets(lengths, parts)
        assert sorted(i for g in groups for i in g) == list(range(7))
        assert len(groups) == parts and all(g == sorted(g) for g in groups)
        assert padded(lengths, groups) == best_padding(lengths, parts), (lengths, parts)


def test_length_buckets_token_cap_and_tolerance():
    lengths = [5, 30, 6, 29, 7, 31, 8, 3]
    capped = length_buckets(lengths, 1, max_tokens=64)
    assert all(len(g) * max(lengths[i] for i in g) <= 64 for g in capped)
    assert len(capped) == 3  # 29, 30, 31 need two (3 x 31 > 64); the five short rows fit one (5 x 8)
    # as many micro-batches as minimise padded tokens + forward_cost each (brute force agrees)
    six = lengths[:6]
    for cost in (0.5, 4, 20, 64, 1000):
        got = length_buckets(six, 6, forward_cost=cost)
        want = min(best_padding(six, g) + cost * g for g in range(1, 7))
        assert padded(six, got) + cost * len(got) == want, cost
    assert len(length_buckets(lengths, 8, forward_cost=1000)) == 1
    assert length_buckets([10] * 6, 4, forward_cost=1) == [list(range(6))]  # no padding to save
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        length_buckets(lengths, 1, max_tokens=20)


def cls_varlen(n: int, seed: int) -> TokenizedDataset:
    """Label = whether token 7 appears; rows of 3 to 14 tokens, so batches have padding."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        k = int(torch.randint(3, 15, (), generator=g))
        ids = torch.randint(10, 96, (k,), generator=g).tolist()
        y = int(torch.rand((), generator=g) < 0.5)
        if y:
            ids[k // 2] = 7
        examples.append({"input_ids": ids, "attention_mask": [1] * k, "labels": y})
    return TokenizedDataset(examples, task="classification", pad_id=0)


def lm_varlen(n: int, seed: int) -> TokenizedDataset:
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        ids = torch.randint(1, 96, (int(torch.randint(4, 13, (), generator=g)),), generator=g).tolist()
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return TokenizedDataset(examples, task="lm", pad_id=0)


def bert_with(names: list[str]) -> torch.nn.Module:
    model = tiny_model("bert", **NO_DROPOUT)
    for i, n in enumerate(names):
        torch.manual_seed(100 + i)
        head = {"num_labels": 2, "dropout": 0.0}
        kw = {"r": 4, "init": "random", "head": head}
        cfg = pa.ParallelConfig(**kw) if i % 2 == 0 else pa.LoRAConfig(**kw)
        pa.add_adapter(model, n, cfg)
    return model


def adapter_grads(tr: Trainer) -> dict[str, torch.Tensor]:
    tr.model.train()
    tr._accumulate()
    out = {}
    for t in tr.tasks:
        for k, p in tr.model.paradapt[t.name].named_parameters():
            if p.grad is not None:
                out[f"{t.name}.{k}"] = p.grad.clone()
    return out


@pytest.mark.parametrize(
    "micro", [{"micro_batches": 2}, {"micro_batches": "auto"}, {"micro_batch_tokens": 40}]
)
def test_micro_batches_give_the_one_forward_gradients_and_losses(micro, monkeypatch):
    # tiny rows (3-14 tokens) save less than 64 tokens a forward: let auto split them
    monkeypatch.setattr(loop, "AUTO_FORWARD_COST_TOKENS", 4)
    names = ["a", "b", "c"]
    data = {n: cls_varlen(24, i) for i, n in enumerate(names)}
    base = bert_with(names)
    args = TrainArgs(max_steps=4, batch_size=12, lr=1e-2, log_every=1, micro_batches=1)
    one = Trainer(copy.deepcopy(base), [Task(n, data[n]) for n in names], args)
    split = Trainer(
        copy.deepcopy(base), [Task(n, data[n]) for n in names], TrainArgs(**{**args.__dict__, **micro})
    )
    g1, g2 = adapter_grads(one), adapter_grads(split)
    assert split.padded_tokens < one.padded_tokens  # the point: less padding for the same rows
    assert g1.keys() == g2.keys() and len(g1) > 6
    for k in g1:
        assert g1[k].abs().sum() > 0, k
        torch.testing.assert_close(g2[k], g1[k], atol=1e-6, rtol=1e-5, msg=k)
    for tr in (one, split):
        for opt in tr.opts.values():
            opt.zero_grad(set_to_none=True)
        tr.cursors = {n: type(c)() for n, c in tr.cursors.items()}
        tr.train(progress=False)
    c1 = [h["loss"] for h in one.history if "loss" in h]
    c2 = [h["loss"] for h in split.history if "loss" in h]
    for r1, r2 in zip(c1, c2, strict=True):
        for n in names:
            assert r2[n] == pytest.approx(r1[n], rel=1e-5, abs=1e-6)


def test_micro_batched_joint_run_matches_separate_runs_lm():
    """LM rows of different lengths: each adapter's loss is a mean over its target tokens."""
    base = tiny_model("llama")

    def fresh(names):
        m = copy.deepcopy(base)
        for n in names:
            torch.manual_seed(hash(n) % 1000)
            pa.add_adapter(m, n, pa.LoRAConfig(r=4, init="random"))
        return m

    data = {"a": lm_varlen(8, 0), "b": lm_varlen(8, 1)}
    args = TrainArgs(max_steps=4, batch_size=4, lr=1e-2, log_every=1, max_grad_norm=None)
    both = fresh(["a", "b"])
    joint = Trainer(
        both, [Task(n, data[n]) for n in "ab"], TrainArgs(**{**args.__dict__, "micro_batches": 2})
    )
    joint.train(progress=False)
    for n in "ab":
        alone = fresh([n])
        Trainer(alone, [Task(n, data[n])], TrainArgs(**{**args.__dict__, "batch_size": 2})).train(
            progress=False
        )
        for (k, p), q in zip(
            both.paradapt[n].state_dict().items(), alone.paradapt[n].state_dict().values(), strict=True
        ):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=k)


def test_micro_batches_with_gradient_checkpointing_recompute_under_their_own_routes():
    names = ["a", "b"]
    data = {n: cls_varlen(16, i) for i, n in enumerate(names)}
    base = bert_with(names)
    args = TrainArgs(max_steps=1, batch_size=8, micro_batches=3)
    plain = adapter_grads(Trainer(copy.deepcopy(base), [Task(n, data[n]) for n in names], args))
    ckpt_args = TrainArgs(**{**args.__dict__, "gradient_checkpointing": True})
    ckpt = adapter_grads(Trainer(copy.deepcopy(base), [Task(n, data[n]) for n in names], ckpt_args))
    assert plain.keys() == ckpt.keys() and plain
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-5, msg=k)


def test_resume_with_micro_batches_and_dropout_continues_the_same_curve():
    names = ["a", "b"]
    data = {n: cls_varlen(20, i) for i, n in enumerate(names)}

    def run(stop_at=None, state=None):
        torch.manual_seed(0)
        model = tiny_model("bert")  # dropout 0.1: masks must come out the same after resuming
        for n in names:
            pa.add_adapter(model, n, pa.ParallelConfig(r=4, head={"num_labels": 2, "dropout": 0.1}))
        args = TrainArgs(max_steps=6, batch_size=8, log_every=1, warmup_steps=2, micro_batches=2)
        tr = Trainer(model, [Task(n, data[n]) for n in names], args)
        if state is not None:
            tr.load_state_dict(state)
        tr.train(progress=False, stop_at=stop_at)
        return tr

    full = run()
    resumed = run(state=copy.deepcopy(run(stop_at=3).state_dict()))
    want = [h["loss"] for h in full.history if "loss" in h][3:]
    assert [h["loss"] for h in resumed.history if "loss" in h] == want


def test_bad_micro_batch_settings_fail_before_training():
    task = Task("a", cls_varlen(8, 0))
    model = bert_with(["a"])
    with pytest.raises(
        ConfigError, match=r"train\.micro_batch_tokens.*longest training row of a \(\d+ tokens\)"
    ):
        Trainer(model, [task], TrainArgs(micro_batch_tokens=5))
    with pytest.raises(ConfigError, match=r"train\.micro_batches.*'auto' or an integer >= 1, got 0"):
        Trainer(model, [task], TrainArgs(micro_batches=0))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("micro_batches", 0, "train.micro_batches: must be 'auto' or an integer >= 1, got 0"),
        ("micro_batches", "two", "train.micro_batches: must be 'auto' or an integer >= 1, got 'two'"),
        ("micro_batch_tokens", 0, "train.micro_batch_tokens: input should be greater than or equal to 1"),
    ],
)
def test_config_checks_the_micro_batch_keys(key, value, message):
    raw = {"output_dir": "x", "adapter": {"name": "a", "data": "a.jsonl"}, "train": {key: value}}
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(raw)
    raw["train"] = {"micro_batches": 4, "micro_batch_tokens": 2048}
    args = validate(raw).train_args()
    assert (args.micro_batches, args.micro_batch_tokens) == (4, 2048)

"""``torchrun --nproc_per_node=2`` (gloo on CPU) gives the loss curve of one process at the same global batch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from _train_fixtures import losses, make_llama, write_lm_jsonl

from paradapt.train import train
from paradapt.train.distributed import Dist


def test_shard_splits_rows_contiguously_and_keeps_the_padding_width():
    batch = {"input_ids": torch.arange(15).view(5, 3)}
    parts = [Dist(r, 2).shard(batch, list("abcde")) for r in (0, 1)]
    assert [p[1] for p in parts] == [["a", "b"], ["c", "d", "e"]]
    assert torch.equal(torch.cat([p[0]["input_ids"] for p in parts]), batch["input_ids"])
    assert Dist().shard(batch, list("abcde"))[0] is batch


def test_torchrun_two_processes_give_the_single_process_loss_curve(tmp_path):
    model = make_llama(tmp_path / "llama")
    a, b = write_lm_jsonl(tmp_path / "a.jsonl", 24, seed=1), write_lm_jsonl(tmp_path / "b.jsonl", 24, seed=2)
    adapter = {"kind": "lora", "config": {"r": 4, "init": "random"}, "eval_fraction": 0.25}
    cfg = {
        "model": str(model),
        "output_dir": str(tmp_path / "one"),
        # batch_size 2: each rank holds one row, so each rank's other adapter gets no rows (zero grads)
        "adapters": [{"name": "a", "data": str(a), **adapter}, {"name": "b", "data": str(b), **adapter}],
        "tokenize": {"max_length": 16},
        "train": {
            "max_steps": 5,
            "batch_size": 2,
            "grad_accum": 2,
            "lr": 1e-2,
            "log_every": 1,
            "eval_every": 5,
            "eval_batch_size": 1,  # several eval batches, shared by the ranks
        },
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    train(cfg, progress=False)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "paradapt.cli", "train", str(tmp_path / "cfg.yaml"), f"--output_dir={tmp_path / 'two'}", "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 5 steps") == 1  # only rank 0 reports (and writes)

    one, two = losses(tmp_path / "one" / "metrics.jsonl"), losses(tmp_path / "two" / "metrics.jsonl")
    assert [s for s, _ in two] == [s for s, _ in one] == [1, 2, 3, 4, 5]
    for (_, x), (_, y) in zip(one, two, strict=True):
        assert x.keys() == y.keys() == {"a", "b"}
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=1e-5), (k, x[k], y[k])

    def evals(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["eval"] for line in lines if '"eval"' in line]

    assert len(evals("two")) == len(evals("one")) == 1
    for k in ("a", "b"):  # eval batches split between the ranks, sums all-reduced
        assert evals("two")[0][k]["loss"] == pytest.approx(evals("one")[0][k]["loss"], rel=1e-5)
    for k in ("a", "b"):
        w1 = torch.load(tmp_path / "one" / "checkpoints" / "step-5" / "trainer_state.pt", weights_only=True)
        w2 = torch.load(tmp_path / "two" / "checkpoints" / "step-5" / "trainer_state.pt", weights_only=True)
        for name, t in w1["adapters"][k].items():
            torch.testing.assert_close(w2["adapters"][k][name], t, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_one_checkpoint(tmp_path):
    """The terminal's Ctrl-C reaches torchrun and every worker (then torchrun signals them
    again): all ranks stop after the same step and rank 0 writes the checkpoint."""
    import signal
    import time

    model = make_llama(tmp_path / "llama")
    data = write_lm_jsonl(tmp_path / "a.jsonl", 24)
    cfg = {
        "model": str(model),
        "output_dir": str(tmp_path / "run"),
        "adapter": {"name": "a", "kind": "lora", "data": str(data)},
        "tokenize": {"max_length": 16},
        "train": {"max_steps": 10**6, "batch_size": 4, "log_every": 1},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "paradapt.cli", "train", str(tmp_path / "cfg.yaml"), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        while not (tmp_path / "run" / "metrics.jsonl").is_file() and proc.poll() is None:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    saved = re.findall(r"interrupted at step (\d+); checkpoint saved to (\S+)", err)
    assert len(saved) == 1, err[-3000:]
    step = saved[0][0]
    assert (tmp_path / "run" / "checkpoints" / f"step-{step}" / "trainer_state.pt").is_file()

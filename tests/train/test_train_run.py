"""``paradapt.train.train``: whole runs on tiny model folders: outputs, checkpoints, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from _train_fixtures import (
    cls_config,
    lm_config,
    losses,
    make_bert,
    make_llama,
    write_cls_jsonl,
    write_lm_jsonl,
)

import paradapt as pa
from paradapt.errors import ConfigError
from paradapt.heads import classify
from paradapt.loading import load_model
from paradapt.train import Interrupted, train
from paradapt.train import checkpoint as ckpt
from paradapt.train.data import DataError


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture
def cls_data(tmp_path):
    return write_cls_jsonl(tmp_path / "cls.jsonl", 64)


@pytest.fixture
def lm_data(tmp_path):
    return write_lm_jsonl(tmp_path / "lm.jsonl", 40)


def stop_at(step: int, exc: type[BaseException] = KeyboardInterrupt):
    """A callback that raises ``exc`` once the trainer has finished ``step``."""

    def cb(trainer):
        if trainer.step == step:
            raise exc("stop")

    return cb


def test_run_writes_adapters_best_checkpoints_metrics_and_curves(bert, cls_data, tmp_path):
    out = tmp_path / "run"
    result = train(
        cls_config(bert, cls_data, out, max_steps=6, eval_every=2, save_every=2, keep_checkpoints=2),
        progress=False,
    )
    assert result.steps == 6 and set(result.metrics) == {"cls"} and "accuracy" in result.metrics["cls"]
    assert [p.name for p in ckpt.checkpoints(out)] == ["step-4", "step-6"]  # the latest 2 kept
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp folders
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 and set(r["loss"]) == {"cls"} for r in steps)
    assert steps[0]["lr"] > steps[3]["lr"] > steps[5]["lr"] == 0.0  # cosine to zero
    assert [r["step"] for r in records if "eval" in r] == [2, 4, 6]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = json.loads((out / "best" / "best.json").read_text())["cls"]
    assert best["step"] in (2, 4, 6) and (out / "best" / "cls").is_dir()

    # the final adapter loads with its head and gives the trained model's logits
    tok, model = load_model(bert)
    pa.load_adapter(model, result.adapters["cls"], "cls")
    batch = tok(["w1 good w2", "bad w3"], return_tensors="pt", padding=True)
    with torch.no_grad(), pa.route(model, ["cls", "cls"]):
        hidden = model(**batch).last_hidden_state
    logits = classify(model, hidden, batch["attention_mask"], "cls")
    assert logits.shape == (2, 2) and model.paradapt["cls"].head.labels == ["neg", "pos"]
    state = ckpt.load_state(out / "checkpoints" / "step-6")
    for k, v in model.paradapt["cls"].state_dict().items():
        torch.testing.assert_close(v, state["adapters"]["cls"][k], msg=k)


def test_ctrl_c_saves_a_checkpoint_and_resume_gives_the_same_loss_curve(llama, lm_data, tmp_path):
    full = train(lm_config(llama, lm_data, tmp_path / "full"), progress=False)
    with pytest.raises(Interrupted) as e:
        train(lm_config(llama, lm_data, tmp_path / "cut"), progress=False, callbacks=[stop_at(3)])
    assert e.value.step == 3 and e.value.checkpoint == tmp_path / "cut" / "checkpoints" / "step-3"
    resumed = train(lm_config(llama, lm_data, tmp_path / "cut"), resume=True, progress=False)
    assert resumed.steps == full.steps == 8
    want, got = losses(tmp_path / "full" / "metrics.jsonl"), losses(tmp_path / "cut" / "metrics.jsonl")
    assert [s for s, _ in got] == list(range(1, 9))
    assert got == want  # bit-identical: same batches, optimizer state and dropout masks
    assert resumed.metrics == full.metrics


def test_resume_from_an_older_checkpoint_drops_the_later_metrics(llama, lm_data, tmp_path):
    """A crash (not Ctrl-C) after step 5 leaves step-3 as the latest checkpoint; resuming
    there replaces the logged steps 4-5 instead of duplicating them."""
    full = losses(
        train(lm_config(llama, lm_data, tmp_path / "full"), progress=False).output_dir / "metrics.jsonl"
    )
    cfg = lm_config(llama, lm_data, tmp_path / "cut", save_every=3)
    with pytest.raises(RuntimeError):
        train(cfg, progress=False, callbacks=[stop_at(5, RuntimeError)])
    assert ckpt.latest(tmp_path / "cut").name == "step-3"
    train(cfg, resume=str(tmp_path / "cut" / "checkpoints" / "step-3"), progress=False)
    assert losses(tmp_path / "cut" / "metrics.jsonl") == full


def test_two_adapters_in_one_run(bert, tmp_path):
    """Heads of different widths (2 and 3 classes) share each forward; both adapters learn."""
    a = write_cls_jsonl(tmp_path / "a.jsonl", 32, seed=1)
    b = tmp_path / "b.jsonl"
    rows = [
        {"text": f"{w} w{i % 7}", "label": w[0]} for i in range(48) for w in [("good", "bad", "plot")[i % 3]]
    ]
    b.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cls_config(bert, a, tmp_path / "run", max_steps=8, batch_size=12)
    first = cfg.pop("adapter")
    cfg["adapters"] = [first, {"name": "other", "kind": "lora", "data": str(b), "eval_data": str(b)}]
    result = train(cfg, progress=False)
    assert set(result.adapters) == {"cls", "other"} and all(p.is_dir() for p in result.adapters.values())
    curve = losses(tmp_path / "run" / "metrics.jsonl")
    assert all(set(x) == {"cls", "other"} for _, x in curve)
    assert curve[-1][1]["other"] < curve[0][1]["other"]  # finite and falling despite the -inf padding
    saved = pa.io.read_config(result.adapters["other"])
    assert saved["config"]["head"]["labels"] == ["b", "g", "p"]  # head added from the data's labels
    assert set(result.metrics) == {"cls", "other"}


def test_fresh_run_refuses_an_earlier_runs_folder(bert, cls_data, tmp_path):
    cfg = cls_config(bert, cls_data, tmp_path / "run", max_steps=1)
    train(cfg, progress=False)
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        train(cfg, progress=False)
    assert train(cfg, progress=False, overwrite=True).steps == 1
    assert len(losses(tmp_path / "run" / "metrics.jsonl")) == 1
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        train(cls_config(bert, cls_data, tmp_path / "empty"), resume=True, progress=False)


def test_overrides_from_python(bert, cls_data, tmp_path):
    result = train(
        cls_config(bert, cls_data, tmp_path / "run"),
        progress=False,
        train={"max_steps": 2},
        **{"train.lr": 0.5},
    )
    assert result.steps == 2
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["lr"] == 0.5


# -- bad input: clear errors before step 1 ---------------------------------------------------------


def bad_run(bert, tmp_path, text: str, **adapter):
    data = tmp_path / "bad.jsonl"
    data.write_text(text)
    cfg = cls_config(bert, data, tmp_path / "run")
    cfg["adapter"].update(adapter)
    cfg["adapter"].pop("eval_fraction")
    return cfg


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"text": "good", "label": "pos"}\n{"text": oops}\n', r"bad\.jsonl:2: malformed JSON"),
        ("\n\n", r"bad\.jsonl: no records"),
        ('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "meh"}\n', r"bad\.jsonl:2: label 'meh'"),
        (
            '{"text": "good", "label": "pos"}\n{"txt": "bad", "label": "neg"}\n',
            r"bad\.jsonl:2: missing field",
        ),
    ],
)
def test_bad_data_fails_before_training(bert, tmp_path, text, match):
    with pytest.raises(DataError, match=match):
        train(bad_run(bert, tmp_path, text), progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_label_outside_a_numbered_head(bert, tmp_path):
    text = '{"text": "good", "label": 0}\n{"text": "bad", "label": 2}\n'
    cfg = bad_run(bert, tmp_path, text, config={"head": {"num_labels": 2}})
    with pytest.raises(DataError, match=r"bad\.jsonl:2: label 2 is not one of the 2 classes"):
        train(cfg, progress=False)


def test_head_on_lm_data_and_mixed_tasks_fail(bert, tmp_path):
    cfg = bad_run(bert, tmp_path, '{"text": "w1 w2"}\n{"text": "w3 w4"}\n')
    with pytest.raises(ConfigError, match=r"adapters\.0\.config\.head: .*task 'lm'"):
        train(cfg, progress=False)


def test_long_sequences_warn_once_with_the_count(bert, tmp_path):
    data = tmp_path / "long.jsonl"
    rows = [{"text": " ".join(["w1"] * n), "label": "pos" if n % 2 else "neg"} for n in (3, 20, 30, 4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cls_config(bert, data, tmp_path / "run", max_steps=1)
    cfg["adapter"].pop("eval_fraction")
    cfg["tokenize"] = {"max_length": 10}
    with pytest.warns(UserWarning) as record:
        train(cfg, progress=False)
    msgs = [str(w.message) for w in record if "max_length" in str(w.message)]
    assert msgs == ["2 of 4 records were longer than max_length=10 tokens and were truncated"]


def test_a_failed_checkpoint_write_leaves_the_previous_ones_intact(llama, lm_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(lm_config(llama, lm_data, out, save_every=2), progress=False, callbacks=[stop_at(2)])
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert before == ["step-2"]

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(lm_config(llama, lm_data, out, save_every=2), resume=True, progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # no partial step-4
    monkeypatch.undo()
    assert ckpt.load_state(out / "checkpoints" / "step-2")["step"] == 2


def test_resuming_a_finished_run_changes_nothing(bert, cls_data, tmp_path):
    cfg = cls_config(bert, cls_data, tmp_path / "run", max_steps=2)
    first = train(cfg, progress=False)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = train(cfg, resume=True, progress=False)
    assert again.steps == 2 and again.metrics == first.metrics
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics


def test_quantize_int4_trains_adapters_beside_an_int4_base(llama, lm_data, tmp_path):
    from paradapt.quantized import quantization

    seen = []
    cfg = {**lm_config(llama, lm_data, tmp_path / "q"), "quantize": "int4", "quantize_group_size": 32}
    result = train(cfg, progress=False, callbacks=[lambda t: seen.append(quantization(t.model)["precision"])])
    assert seen and set(seen) == {"int4"}  # every step ran on the int4 base
    meta = json.loads((result.adapters["lm"] / "adapter_config.json").read_text())
    assert meta["base_model"]["quantization"]["precision"] == "int4"
    curve = [loss["lm"] for _, loss in losses(result.output_dir / "metrics.jsonl")]
    assert curve[-1] < curve[0]  # the adapter learns through the quantised layers


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"quantize": "int3"}, "quantize"),
        ({"quantize": "int4", "quantize_group_size": 48}, "quantize_group_size"),
        ({"quantize_group_size": 32}, "quantize_group_size"),
    ],
)
def test_bad_quantize_settings_name_their_key(llama, lm_data, tmp_path, extra, field):
    with pytest.raises(ConfigError) as e:
        train({**lm_config(llama, lm_data, tmp_path / "bad"), **extra}, progress=False)
    assert e.value.field == field


def test_loftq_adapters_are_added_to_the_float_base_then_it_is_quantised(llama, lm_data, tmp_path):
    """``init: loftq`` with ``quantize: int4``: the adapter starts from the float weights' int4
    error (non-zero B), then trains on the int4 base like any other; without int4 it is refused."""
    from paradapt.quantized import quantization

    base = lm_config(llama, lm_data, tmp_path / "lq")
    base["adapters"][0]["config"] = {**base["adapters"][0].get("config", {}), "init": "loftq"}
    with pytest.raises(ConfigError) as e:
        train(base, progress=False)
    assert e.value.field == "quantize" and "int4" in e.value.message
    seen = []
    result = train({**base, "quantize": "int4"}, progress=False, callbacks=[lambda t: seen.append(quantization(t.model)["precision"])])
    assert seen and set(seen) == {"int4"}
    meta = json.loads((result.adapters["lm"] / "adapter_config.json").read_text())
    assert meta["base_model"]["quantization"]["precision"] == "int4"

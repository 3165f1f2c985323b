"""ParadaptTrainer: paradapt adapters trained under transformers.Trainer, saved as adapter folders only."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_model
from transformers import TrainingArguments

import paradapt as pa
from paradapt.train.hf import MANIFEST, ParadaptTrainer, ParadaptTrainerError, checkpoint_files

LABELS = ["low", "high"]
TRAINER_FILES = ["optimizer.pt", "rng_state.pth", "scheduler.pt", "trainer_state.json", "training_args.bin"]


def toy_rows(n: int = 64, length: int = 8, seed: int = 0) -> list[dict]:
    """Sequences drawn from the low or high half of the vocabulary; the label says which."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        y = i % 2
        ids = torch.randint(4 + 44 * y, 48 + 44 * y, (length,), generator=g)
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones(length, dtype=torch.long),
                "labels": torch.tensor(y),
            }
        )
    return rows


def bert_with_adapter(seed: int = 0):
    model = tiny_model("bert")
    torch.manual_seed(seed)
    pa.add_adapter(model, "toy", pa.ParallelConfig(r=8, head={"labels": LABELS, "dropout": 0.0}))
    return model


def args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_steps=6,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return TrainingArguments(**{**base, **kw})


@torch.no_grad()
def toy_loss(model, rows) -> float:
    model.eval()
    ids = torch.stack([r["input_ids"] for r in rows])
    mask = torch.stack([r["attention_mask"] for r in rows])
    y = torch.stack([r["labels"] for r in rows])
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return float(torch.nn.functional.cross_entropy(model.paradapt["toy"].head(hidden, mask), y))


def base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("paradapt.")}


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.paradapt["toy"].state_dict().items()}


@pytest.fixture(autouse=True)
def quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)


def test_trains_adapter_only_and_checkpoints_hold_adapter_folders(tmp_path):
    model = bert_with_adapter()
    rows = toy_rows()
    before_base, before_loss = base_state(model), toy_loss(model, rows)
    ParadaptTrainer(model, args(tmp_path), train_dataset=rows).train()

    assert toy_loss(model, rows) < 0.75 * before_loss
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before_base.items())
    for step in (6, 12):  # adapter folder + Trainer's own state files; no model.safetensors
        assert checkpoint_files(tmp_path / f"checkpoint-{step}") == sorted(
            [MANIFEST, "toy/adapter.safetensors", "toy/adapter_config.json"] + TRAINER_FILES
        )
    opt = torch.load(tmp_path / "checkpoint-12" / "optimizer.pt", weights_only=True)
    n_adapter = sum(p.numel() for p in model.paradapt["toy"].parameters())
    assert sum(s["exp_avg"].numel() for s in opt["state"].values()) == n_adapter


def test_saved_adapter_reloads_onto_a_fresh_base(tmp_path):
    model = bert_with_adapter()
    rows = toy_rows()
    trainer = ParadaptTrainer(model, args(tmp_path, max_steps=6, save_steps=100), train_dataset=rows)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert checkpoint_files(tmp_path / "final") == sorted(
        [MANIFEST, "toy/adapter.safetensors", "toy/adapter_config.json", "training_args.bin"]
    )
    fresh = tiny_model("bert")
    pa.load_adapter(fresh, tmp_path / "final" / "toy")
    pa.set_active(fresh, "toy")
    assert fresh.paradapt["toy"].head.labels == LABELS
    assert toy_loss(fresh, rows) == pytest.approx(toy_loss(model, rows), abs=1e-6)
    ids = torch.stack([r["input_ids"] for r in rows[:4]])
    model.eval()
    torch.testing.assert_close(fresh(ids).last_hidden_state, model(ids).last_hidden_state, rtol=0, atol=1e-6)


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    rows = toy_rows()
    straight = bert_with_adapter()
    ParadaptTrainer(straight, args(tmp_path / "a"), train_dataset=rows).train()

    resumed = bert_with_adapter(seed=1)  # other init: the checkpoint must overwrite it
    trainer = ParadaptTrainer(resumed, args(tmp_path / "b"), train_dataset=rows)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    a, b = adapter_state(straight), adapter_state(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_causal_lm_trains_with_the_models_own_loss(tmp_path):
    model = tiny_model("llama")
    pa.add_adapter(model, "lm", pa.LoRAConfig(r=4))
    ids = torch.randint(3, 96, (1, 16), generator=torch.Generator().manual_seed(0)).repeat(16, 1)
    rows = [{"input_ids": r, "labels": r} for r in ids]
    before = base_state(model)
    with torch.no_grad():
        loss0 = float(model(input_ids=ids[:1], labels=ids[:1]).loss)
    ParadaptTrainer(
        model, args(tmp_path, max_steps=8, save_steps=4, learning_rate=1e-2), train_dataset=rows
    ).train()
    model.eval()
    with torch.no_grad():
        assert float(model(input_ids=ids[:1], labels=ids[:1]).loss) < loss0
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert "lm/adapter.safetensors" in checkpoint_files(tmp_path / "checkpoint-4")


def test_bad_input_is_refused_before_training(tmp_path):
    with pytest.raises(ParadaptTrainerError, match="no paradapt adapters"):
        ParadaptTrainer(tiny_model("bert"), args(tmp_path))
    model = bert_with_adapter()
    with pytest.raises(pa.AdapterNotFoundError, match="nope"):
        ParadaptTrainer(model, args(tmp_path), adapters=["nope"])
    model.embeddings.word_embeddings.weight.requires_grad_(True)
    with pytest.raises(ParadaptTrainerError, match="embeddings.word_embeddings.weight"):
        ParadaptTrainer(model, args(tmp_path))


def test_resume_from_a_non_paradapt_checkpoint_names_the_file(tmp_path):
    model = bert_with_adapter()
    trainer = ParadaptTrainer(model, args(tmp_path), train_dataset=toy_rows())
    (tmp_path / "bogus").mkdir()
    with pytest.raises(pa.AdapterFileError, match=MANIFEST):
        trainer.train(resume_from_checkpoint=str(tmp_path / "bogus"))

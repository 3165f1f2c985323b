"""``paradapt train`` with a mixture entry: router-only and joint training, saving, resume, bad input.

Two synthetic LM tasks that every token tells apart (task A counts by 1 over w0..w19, task B by
3 over w20..w39) on a tiny random Llama; one run trains an expert per task, then a mixture over
the two frozen experts learns its router on the unlabelled mix of both files.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from _train_fixtures import WORDS, losses, save_tiny_llama, save_tokenizer
from conftest import asset_path, require_asset

import paradapt as pa
from paradapt.errors import ConfigError
from paradapt.loading import load_model
from paradapt.train import Interrupted, load_mixture, train
from paradapt.train import checkpoint as ckpt
from paradapt.train.config import load_config


def write_task(path: Path, lo: int, step: int, n: int, seed: int) -> Path:
    """Rows of 10 words counting by ``step`` (mod 20) over ``WORDS[lo:lo + 20]``."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            k = rng.randrange(20)
            f.write(json.dumps({"text": " ".join(WORDS[lo + (k + step * t) % 20] for t in range(10))}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model folder, the two task files and two experts trained on them (one run)."""
    root = tmp_path_factory.mktemp("mixture")
    # initializer_range 0.2: the frozen LM head can give confident logits (std 0.02 caps them)
    llama = save_tiny_llama(
        root / "llama", save_tokenizer(root / "llama", cls_sep=False), eos_token_id=4, initializer_range=0.2
    )
    a = write_task(root / "a.jsonl", 0, 1, 64, seed=0)
    b = write_task(root / "b.jsonl", 20, 3, 64, seed=1)
    run = train(
        {
            "model": str(llama),
            "output_dir": str(root / "experts"),
            "adapters": [
                {"name": "ta", "kind": "parallel", "config": {"r": 16, "scale": 4.0}, "data": str(a)},
                {"name": "tb", "kind": "parallel", "config": {"r": 16, "scale": 4.0}, "data": str(b)},
            ],
            "tokenize": {"max_length": 16, "packing": False},
            "train": {"max_steps": 60, "batch_size": 8, "lr": 0.05, "log_every": 10},
        },
        progress=False,
    )
    return {"root": root, "llama": llama, "a": a, "b": b, "ta": run.adapters["ta"], "tb": run.adapters["tb"]}


def mixture_config(s: dict, out: Path, **train_opts) -> dict:
    return {
        "model": str(s["llama"]),
        "output_dir": str(out),
        "adapters": [
            {
                "name": "mix",
                "kind": "mixture",
                "config": {"train_experts": False},
                "experts": [{"path": str(s["ta"])}, {"path": str(s["tb"])}],
                "aux_loss_coef": 0.01,
                "data": [str(s["a"]), str(s["b"])],
                "eval_fraction": 0.25,
            }
        ],
        "tokenize": {"max_length": 16, "packing": False},
        "train": {"max_steps": 100, "batch_size": 8, "lr": 0.05, "log_every": 10, **train_opts},
    }


def lm_loss(tok, model, path: Path, adapter) -> float:
    """Mean next-token loss on the first 32 rows of ``path``: routed to a name, or ``adapter`` active."""
    rows = [json.loads(line)["text"] for line in path.read_text().splitlines()][:32]
    batch = tok(rows, return_tensors="pt", padding=True)
    with torch.no_grad():
        if isinstance(adapter, str):
            with pa.route(model, [adapter] * len(rows)):
                logits = model(**batch).logits
        else:
            pa.set_active(model, adapter)
            logits = model(**batch).logits
            pa.set_active(model, None)
    ids = batch["input_ids"]
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:]).item()


def keep_trainer(store: dict):
    def cb(trainer):
        store["trainer"] = trainer

    return cb


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter.safetensors"))


def test_yaml_router_only_run_nears_the_oracle_beats_average_and_loads_back(setup, tmp_path):
    cfg = mixture_config(setup, "run")  # relative output_dir: the working directory's
    cfg["adapters"][0]["experts"] = [{"path": "../experts/adapters/ta"}, {"path": "../experts/adapters/tb"}]
    cfg_file = setup["root"] / "conf" / "mix.yaml"  # expert paths relative to the config file
    cfg_file.parent.mkdir(exist_ok=True)
    cfg_file.write_text(yaml.safe_dump(cfg))
    seen: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = train(str(cfg_file), progress=False, callbacks=[keep_trainer(seen)])
    finally:
        os.chdir(cwd)
    out = tmp_path / "run"
    # the run's folder holds the mixture and its experts; the README names the folders it needs
    assert set(result.adapters) == {"mix", "ta", "tb"}
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["mix", "ta", "tb"]
    assert "`../ta/`" in (out / "adapters" / "mix" / "README.md").read_text()
    assert json.loads((out / "adapters" / "mix" / "adapter_config.json").read_text())["config"][
        "experts"
    ] == [
        "ta",
        "tb",
    ]
    # router-only: the experts are bit-identical to the folders they were loaded from
    for e in ("ta", "tb"):
        want, got = tensors(setup[e]), tensors(out / "adapters" / e)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # eval ran on held-out rows of the mix
    assert set(result.metrics) == {"mix"} and result.metrics["mix"]["loss"] > 0

    tok, model = load_model(setup["llama"])
    load_mixture(model, out / "adapters" / "mix")
    assert sorted(pa.list_adapters(model)) == ["mix", "ta", "tb"]
    trained = seen["trainer"].model
    batch = tok(["w1 w2 w3 w4", "w20 w23 w26 w29"], return_tensors="pt", padding=True)
    with torch.no_grad(), pa.route(model, ["mix", "mix"]):
        loaded_logits = model(**batch).logits
    trained.eval()
    with torch.no_grad(), pa.route(trained, ["mix", "mix"]):
        trained_logits = trained(**batch).logits
    assert torch.equal(loaded_logits, trained_logits)

    # quality: each task through the one mixture is near the oracle and well below Average
    avg = pa.Average("ta", "tb")
    for data, own in ((setup["a"], "ta"), (setup["b"], "tb")):
        oracle, mixed = lm_loss(tok, model, data, own), lm_loss(tok, model, data, "mix")
        average, base = lm_loss(tok, model, data, avg), lm_loss(tok, model, data, None)
        assert oracle < average < base
        assert mixed - oracle < 0.4 * (average - oracle), (data.name, oracle, mixed, average)


def test_router_only_gradients_reach_only_the_router(setup, tmp_path):
    seen: dict = {}

    def grads(trainer):
        if trainer.step == 1:  # one more forward/backward after the first step, gradients kept
            trainer.model.train()
            rows, names = trainer._batch()
            batch = trainer.tasks[0].train.collate_fn()(rows)
            trainer._loss_vector(batch, names).sum().backward()
            for n in ("mix", "ta", "tb"):
                seen[n] = [p.grad for p in trainer.model.paradapt[n].parameters()]
            for opt in trainer.opts.values():
                opt.zero_grad(set_to_none=True)

    train(mixture_config(setup, tmp_path / "run", max_steps=2), progress=False, callbacks=[grads])
    assert seen["mix"] and all(g is not None and g.abs().sum() > 0 for g in seen["mix"])
    assert all(g is None for n in ("ta", "tb") for g in seen[n])


def test_joint_training_with_a_new_expert_and_resume_is_exact(setup, tmp_path):
    """A new LoRA-free parallel expert trained with the router next to a loaded, unfrozen one;
    Ctrl-C at step 3 and resume gives the uninterrupted run's loss curve and weights."""

    def config(out):
        cfg = mixture_config(setup, out, max_steps=6, log_every=1, save_every=2)
        entry = cfg["adapters"][0]
        entry["config"] = {"train_experts": True, "granularity": "sequence"}
        entry["experts"] = [
            {"path": str(setup["ta"])},
            {"name": "fresh", "kind": "parallel", "config": {"r": 4, "init": "random", "dropout": 0.1}},
        ]
        return cfg

    full = train(config(tmp_path / "full"), progress=False)
    assert set(full.adapters) == {"mix", "ta", "fresh"}
    state = ckpt.load_state(tmp_path / "full" / "checkpoints" / "step-6")
    assert set(state["adapters"]) == {"mix", "ta", "fresh"}  # trained experts are in the checkpoint
    before, after = tensors(setup["ta"]), tensors(tmp_path / "full" / "adapters" / "ta")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # train_experts: the expert moved

    def stop(trainer):
        if trainer.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        train(config(tmp_path / "cut"), progress=False, callbacks=[stop])
    train(config(tmp_path / "cut"), resume=True, progress=False)
    assert losses(tmp_path / "cut" / "metrics.jsonl") == losses(tmp_path / "full" / "metrics.jsonl")
    # best/ holds the mixture with its experts of the same step: it loads on its own
    tok, model = load_model(setup["llama"])
    load_mixture(model, tmp_path / "full" / "best" / "mix")
    assert sorted(pa.list_adapters(model)) == ["fresh", "mix", "ta"]
    for n in ("mix", "ta", "fresh"):
        want, got = tensors(tmp_path / "full" / "adapters" / n), tensors(tmp_path / "cut" / "adapters" / n)
        assert all(torch.equal(want[k], got[k]) for k in want), n


def test_aux_loss_is_added_for_mixtures(setup, tmp_path):
    """The logged loss is the LM loss plus aux_loss_coef x the balance term (>= 1 per step)."""
    plain = mixture_config(setup, tmp_path / "plain", max_steps=1, log_every=1)
    plain["adapters"][0]["aux_loss_coef"] = 0.0
    heavy = mixture_config(setup, tmp_path / "heavy", max_steps=1, log_every=1)
    heavy["adapters"][0]["aux_loss_coef"] = 10.0
    lo = losses(train(plain, progress=False).output_dir / "metrics.jsonl")[0][1]["mix"]
    hi = losses(train(heavy, progress=False).output_dir / "metrics.jsonl")[0][1]["mix"]
    # a zero router gives f = (1, 0) by ties, P = (.5, .5): K * sum f P = 1 at every site
    assert hi - lo == pytest.approx(10.0, rel=1e-4)


@pytest.mark.parametrize(
    ("change", "field", "match"),
    [
        (
            lambda e: e["experts"][1].update(path="nowhere"),
            "adapters.0.experts.1.path",
            "not an adapter folder",
        ),
        (lambda e: e["config"].update(top_k=3), "adapters.0.config.top_k", "from 1 to 2"),
        (lambda e: e["config"].update(granularity="word"), "adapters.0.config.granularity", "token"),
        (lambda e: e["experts"].pop(), "adapters.0.config.experts", "at least two"),
        (lambda e: e["experts"][1].update(kind="lora"), "adapters.0.experts.1", "either path"),
        (lambda e: e["experts"][1].update(name="mix"), "adapters.0.experts.1.name", "used twice"),
        (lambda e: e["config"].update(experts=["ta"]), "adapters.0.config.experts", "adapters.0.experts"),
        (
            lambda e: e["experts"].__setitem__(1, {"name": "n", "kind": "lora", "config": {"r": 0}}),
            "adapters.0.experts.1.config.r",
            "r",
        ),
        (
            lambda e: e["experts"].__setitem__(1, {"kind": "lora"}),
            "adapters.0.experts.1.name",
            "needs a name",
        ),
    ],
)
def test_bad_mixture_config_fails_before_loading_naming_the_field(setup, tmp_path, change, field, match):
    cfg = mixture_config(setup, tmp_path / "run")
    change(cfg["adapters"][0])
    with pytest.raises(ConfigError, match=match) as e:
        train(cfg, progress=False)
    assert e.value.field == field
    assert not (tmp_path / "run" / "adapters").exists()


def test_experts_on_a_plain_adapter_and_a_broken_expert_folder(setup, tmp_path):
    cfg = mixture_config(setup, tmp_path / "run")
    cfg["adapters"][0]["kind"] = "parallel"
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert e.value.field == "adapters.0.experts"

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    cfg = mixture_config(setup, tmp_path / "run2")
    cfg["adapters"][0]["experts"][1] = {"path": str(broken), "name": "tb"}
    with pytest.raises(ConfigError) as e:
        train(cfg, progress=False)
    assert e.value.field == "adapters.0.experts.1.path"
    assert str(tmp_path) not in str(e.value).replace(str(broken), "broken")  # no other absolute paths


def test_library_refusals_name_the_expert_entry(setup, tmp_path):
    """Experts that share no site (FFN adapters vs a LoRA on q/v): add_mixture's ``experts[0]``
    error (the first expert listed) becomes ``adapters.0.experts.0``."""
    cfg = mixture_config(setup, tmp_path / "run")
    cfg["adapters"][0]["experts"][1] = {"name": "qv", "kind": "lora", "config": {"r": 2}}
    with pytest.raises(ConfigError, match="shares no site") as e:
        train(cfg, progress=False)
    assert e.value.field == "adapters.0.experts.0"


EXAMPLE = Path(__file__).parents[2] / "examples" / "train_mixture.yaml"


def test_example_config_is_valid(tmp_path, monkeypatch):
    monkeypatch.setenv("PARADAPT_ASSETS", str(tmp_path))
    cfg, base = load_config(EXAMPLE)
    mix = cfg.adapter_config(0)
    assert isinstance(mix, pa.Mixture) and mix.experts == ["sst2-parallel", "agnews-parallel"]
    assert mix.train_experts is False and mix.granularity == "sequence" and len(mix.head["labels"]) == 6
    train_specs, evals = cfg.data_specs(0, base)
    assert [s.path for s in train_specs] == [
        str(tmp_path / "data" / "sst2" / "train.tsv"),
        str(tmp_path / "data" / "agnews" / "dev.tsv"),
    ]
    assert evals is None and cfg.adapters[0].eval_fraction == 0.1


def test_example_runs_on_minilm_with_the_bundled_experts(tmp_path):
    """examples/train_mixture.yaml as written (MiniLM, bundled experts, SST-2 + AG News rows), 2 steps."""
    require_asset(asset_path("data", "sst2"), "SST-2 data")
    require_asset(asset_path("data", "agnews"), "AG News data")
    result = train(
        str(EXAMPLE),
        progress=False,
        **{
            "output_dir": str(tmp_path / "run"),
            "train.max_steps": 2,
            "train.batch_size": 4,
            "adapters.0.data.0.limit": 10,
            "adapters.0.data.1.limit": 10,
            "adapters.0.eval_fraction": 0.2,
        },
    )
    assert result.experts == {"mix": ["sst2-parallel", "agnews-parallel"]}
    assert "accuracy" in result.metrics["mix"]
    from paradapt.bundled import bundled_path

    for e in ("sst2-parallel", "agnews-parallel"):  # frozen: the shipped weights, unchanged
        want, got = tensors(bundled_path(e)), tensors(result.adapters[e])
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_data_list_mixing_task_types_fails_naming_the_file(setup, tmp_path):
    from _train_fixtures import write_cls_jsonl

    from paradapt.train.data import DataError

    cls = write_cls_jsonl(tmp_path / "cls.jsonl", 8)
    cfg = mixture_config(setup, tmp_path / "run")
    cfg["adapters"][0]["data"] = [str(setup["a"]), str(cls)]
    with pytest.raises(DataError, match="cls.jsonl:1.*'classification'.*'lm'"):
        train(cfg, progress=False)

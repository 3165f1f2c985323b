"""``paradapt serve --lm-head-gemm`` and ``--layer-gemm``: the products are reported at startup,
and each choice serves the same greedy text as plain ``F.linear``."""

from __future__ import annotations

import pytest
import torch
from _train_fixtures import make_llama
from fastapi.testclient import TestClient

from paradapt import cli
from paradapt.cli import serve as serve_cli
from paradapt.serve import layer_gemm


def _greedy(model_dir, flag: str, mode: str) -> tuple[str, list[str]]:
    """What the startup info says of ``flag``'s product, and two greedy completions."""
    args = cli.build_parser().parse_args(["serve", "--model", str(model_dir), f"--{flag}", mode])
    app, info = serve_cli.build_server_app(args)
    with TestClient(app, base_url="http://localhost") as client:
        r = client.post(
            "/v1/completions",
            json={
                "model": "tiny-llama",
                "prompt": ["good movie", "a bad one"],
                "max_tokens": 6,
                "temperature": 0,
            },
        )
        assert r.status_code == 200, r.text
    return info[flag.replace("-", "_")], [c["text"] for c in r.json()["choices"]]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_packed_and_linear_heads_serve_the_same_greedy_text(tmp_path):
    model_dir = make_llama(tmp_path / "tiny-llama")
    packed, linear = (
        _greedy(model_dir, "lm-head-gemm", "packed"),
        _greedy(model_dir, "lm-head-gemm", "linear"),
    )
    assert (packed[0], linear[0]) == ("packed from 1 rows", "linear")
    assert packed[1] == linear[1]


@pytest.mark.skipif(layer_gemm.unsupported() is not None, reason="the kernel needs AVX2")
def test_kernel_and_linear_layers_serve_the_same_greedy_text(tmp_path):
    model_dir = make_llama(tmp_path / "tiny-llama")
    kernel, linear = _greedy(model_dir, "layer-gemm", "kernel"), _greedy(model_dir, "layer-gemm", "linear")
    assert (kernel[0], linear[0]) == (f"kernel up to {layer_gemm.KERNEL_ROWS} rows", "linear")
    assert kernel[1] == linear[1]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_packed_and_linear_layers_serve_the_same_greedy_text(tmp_path):
    model_dir = make_llama(tmp_path / "tiny-llama")
    packed, linear = _greedy(model_dir, "layer-gemm", "packed"), _greedy(model_dir, "layer-gemm", "linear")
    assert packed[0].startswith("packed from 1 rows (a ") and packed[0].endswith(" MB copy)")
    assert packed[1] == linear[1]


@pytest.mark.parametrize("flag", ["--lm-head-gemm", "--layer-gemm"])
def test_an_unknown_product_is_refused_by_the_parser(capsys, flag):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", flag, "fast"])
    assert flag in capsys.readouterr().err


def test_serve_sets_the_gil_switch_interval_and_reports_it(tmp_path, capsys):
    """``paradapt serve`` shortens the switch interval by default (serve/gil.py), keeps Python's
    with ``--switch-interval 0``, and refuses a negative one by name."""
    import sys

    model_dir = make_llama(tmp_path / "tiny-llama")
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        _, info = serve_cli.build_server_app(
            cli.build_parser().parse_args(["serve", "--model", str(model_dir)])
        )
        assert info["switch_interval"] == pytest.approx(0.0002) == sys.getswitchinterval()
        sys.setswitchinterval(0.005)
        args = cli.build_parser().parse_args(["serve", "--model", str(model_dir), "--switch-interval", "0"])
        _, info = serve_cli.build_server_app(args)
        assert info["switch_interval"] == pytest.approx(0.005) == sys.getswitchinterval()
    finally:
        sys.setswitchinterval(before)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--switch-interval", "-1"])
    assert "--switch-interval" in capsys.readouterr().err

"""``paradapt serve --lm-head-gemm``: the LM head's product is reported at startup, and the packed and
plain products serve the same greedy text."""

from __future__ import annotations

import pytest
import torch
from _train_fixtures import make_llama
from fastapi.testclient import TestClient

from paradapt import cli
from paradapt.cli import serve as serve_cli


def _greedy(model_dir, mode: str) -> tuple[str, list[str]]:
    args = cli.build_parser().parse_args(["serve", "--model", str(model_dir), "--lm-head-gemm", mode])
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
    return info["lm_head_gemm"], [c["text"] for c in r.json()["choices"]]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_packed_and_linear_heads_serve_the_same_greedy_text(tmp_path):
    model_dir = make_llama(tmp_path / "tiny-llama")
    packed, linear = _greedy(model_dir, "packed"), _greedy(model_dir, "linear")
    assert (packed[0], linear[0]) == ("packed from 1 rows", "linear")
    assert packed[1] == linear[1]


def test_an_unknown_head_product_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--lm-head-gemm", "fast"])
    assert "--lm-head-gemm" in capsys.readouterr().err

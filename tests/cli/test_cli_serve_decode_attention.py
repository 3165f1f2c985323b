"""``paradapt serve --decode-attention``: the decode path the engine took is reported at startup, and
every path serves the same greedy text."""

from __future__ import annotations

import pytest
from _train_fixtures import make_llama
from fastapi.testclient import TestClient

from paradapt import cli
from paradapt.cli import serve as serve_cli


def _greedy(model_dir, mode: str) -> tuple[str, str]:
    args = cli.build_parser().parse_args(["serve", "--model", str(model_dir), "--decode-attention", mode])
    app, info = serve_cli.build_server_app(args)
    with TestClient(app, base_url="http://localhost") as client:
        r = client.post(
            "/v1/completions",
            json={"model": "tiny-llama", "prompt": ["good movie", "a bad one"], "max_tokens": 6, "temperature": 0},
        )
        assert r.status_code == 200, r.text
    return info["decode_attention"], [c["text"] for c in r.json()["choices"]]


def test_kernel_compiled_and_gather_serve_the_same_greedy_text(tmp_path):
    model_dir = make_llama(tmp_path / "tiny-llama")
    served = {mode: _greedy(model_dir, mode) for mode in ("gather", "compiled", "kernel")}
    assert {mode: path for mode, (path, _) in served.items()} == {m: m for m in served}
    texts = {mode: text for mode, (_, text) in served.items()}
    assert texts["gather"] == texts["compiled"] == texts["kernel"]


def test_an_unknown_mode_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--decode-attention", "fast"])
    assert "--decode-attention" in capsys.readouterr().err

"""``paradapt serve --quantize``: the base's linears quantised after loading, reported at startup
and in ``/v1/models``; a model that cannot take it stops with the layer's name."""

from __future__ import annotations

import pytest
from _train_fixtures import make_llama, save_tokenizer
from fastapi.testclient import TestClient
from transformers import LlamaConfig, LlamaForCausalLM

from paradapt import cli
from paradapt.cli import serve as serve_cli
from paradapt.cli.common import CLIError
from paradapt.quantized import QuantLinear


def test_serve_quantize_int4_reports_and_generates(tmp_path):
    model_dir = make_llama(tmp_path / "tiny-llama")
    args = cli.build_parser().parse_args(["serve", "--model", str(model_dir), "--quantize", "int4"])
    app, info = serve_cli.build_server_app(args)
    assert info["quantization"] == "int4-g32"
    with TestClient(app, base_url="http://localhost") as client:  # loopback: Host is checked
        models = client.get("/v1/models").json()["data"]
        assert [m["quantization"] for m in models] == ["int4-g32"] * len(models)
        assert 'paradapt_base_weights_info{precision="int4-g32"} 1.0' in client.get("/metrics").text
        r = client.post(
            "/v1/completions", json={"model": "tiny-llama", "prompt": "good movie", "max_tokens": 3}
        )
        assert r.status_code == 200, r.text


def test_serve_default_is_float(tmp_path):
    model_dir = make_llama(tmp_path / "tiny-llama")
    args = cli.build_parser().parse_args(["serve", "--model", str(model_dir)])
    assert args.quantize == "none"
    app, info = serve_cli.build_server_app(args)
    assert info["quantization"] == "none"
    with TestClient(app, base_url="http://localhost") as client:
        assert client.get("/v1/models").json()["data"][0]["quantization"] == "none"
        assert 'paradapt_base_weights_info{precision="none"} 1.0' in client.get("/metrics").text


def test_serve_quantize_refuses_a_model_that_does_not_fit(tmp_path):
    model_dir = tmp_path / "odd-llama"
    vocab = save_tokenizer(model_dir, cls_sep=False)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    args = cli.build_parser().parse_args(["serve", "--model", str(model_dir), "--quantize", "int4"])
    with pytest.raises(
        CLIError, match=r"--quantize int4: layer model\.layers\.0\.mlp\.down_proj: in_features=48"
    ):
        serve_cli.build_server_app(args)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--quantize", "int2"])


def test_quantlinear_is_what_serve_runs(tmp_path):
    model_dir = make_llama(tmp_path / "tiny-llama")
    args = cli.build_parser().parse_args(["serve", "--model", str(model_dir), "--quantize", "int8"])
    app, info = serve_cli.build_server_app(args)
    assert info["quantization"] == "int8"
    model = app.state.loop.engine.model
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert not isinstance(model.lm_head, QuantLinear)  # the LM head stays float


def test_serve_quantize_lm_head_apart_reports_and_generates(tmp_path):
    model_dir = make_llama(tmp_path / "tiny-llama")
    parse = cli.build_parser().parse_args
    args = parse(["serve", "--model", str(model_dir), "--quantize", "int4", "--quantize-lm-head", "int8"])
    app, info = serve_cli.build_server_app(args)
    assert info["quantization"] == "int4-g32+head-int8"
    with TestClient(app, base_url="http://localhost") as client:
        assert client.get("/v1/models").json()["data"][0]["quantization"] == "int4-g32+head-int8"
        r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "good movie", "max_tokens": 3})
        assert r.status_code == 200, r.text
    with pytest.raises(CLIError, match="--quantize-lm-head needs --quantize"):
        serve_cli.build_server_app(parse(["serve", "--model", str(model_dir), "--quantize-lm-head", "int8"]))


def test_the_flags_offer_exactly_the_library_precisions():
    from paradapt.cli.common import QUANTIZE_CHOICES
    from paradapt.quantized import PRECISIONS

    assert set(QUANTIZE_CHOICES) == {"none", *PRECISIONS}

"""``paradapt serve --model smollm2-135m-instruct``: the real SmolLM2 by name, its own chat template
end to end over HTTP. Greedy chat completions for the base model and for a zero-initialised
adapter of each kind equal plain transformers' greedy tokens on the template's prompt."""

from __future__ import annotations

import argparse

import pytest
from conftest import SMOLLM2, SMOLLM2_NEW
from fastapi.testclient import TestClient
from test_models_named import ZERO_INIT

import paradapt as pa
from paradapt.cli import serve as serve_cli
from paradapt.loading import load_model


@pytest.fixture(scope="module")
def zero_adapters(smollm2, tmp_path_factory):
    """An adapter root with one zero-initialised adapter of each kind, saved from SmolLM2."""
    root = tmp_path_factory.mktemp("smollm2-adapters")
    _, model = load_model(SMOLLM2)
    for name, config in ZERO_INIT.items():
        pa.add_adapter(model, name, config)
        pa.fold(model, name)  # reparameterised prefixes are saved folded (a no-op for the others)
        pa.save_adapter(model, name, root / name)
    return root


def _app(*flags: str):
    parser = argparse.ArgumentParser()
    serve_cli.add_parser(parser.add_subparsers())
    return serve_cli.build_server_app(parser.parse_args(["serve", *flags]))


def test_chat_on_smollm2_by_name_uses_its_template_and_equals_transformers(smollm2_reference, zero_adapters):
    app, info = _app(
        "--model", "SmolLM2-135M-Instruct", "--adapter-root", str(zero_adapters), "--threads", "1"
    )
    assert (info["name"], info["kind"], info["adapters"]) == (SMOLLM2, "decoder", len(ZERO_INIT))
    want = smollm2_reference["text"]
    with TestClient(app, base_url="http://localhost") as client:  # bound to loopback: Host is checked
        served = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert served == {SMOLLM2, *ZERO_INIT}
        for model in (SMOLLM2, *ZERO_INIT):
            r = client.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "messages": smollm2_reference["messages"],
                    "max_tokens": SMOLLM2_NEW,
                    "temperature": 0,
                },
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["message"]["content"] == want, model
            assert (
                body["usage"]["prompt_tokens"] == smollm2_reference["ids"].shape[1]
            )  # the template's tokens
            assert body["usage"]["completion_tokens"] == SMOLLM2_NEW
            # each adapter keys its own KV pages: a first request finds none of another's
            assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}, model
        again = client.post(  # the same chat again: its template's pages come from the prefix cache
            "/v1/chat/completions",
            json={"model": SMOLLM2, "messages": smollm2_reference["messages"], "max_tokens": SMOLLM2_NEW, "temperature": 0},
        ).json()
        n = smollm2_reference["ids"].shape[1]
        assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": (n - 1) // 16 * 16}
        assert again["choices"][0]["message"]["content"] == want
        r = client.post(  # the model answers the question it was asked (the conversion kept its weights)
            "/v1/chat/completions",
            json={
                "model": SMOLLM2,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 12,
                "temperature": 0,
            },
        )
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]

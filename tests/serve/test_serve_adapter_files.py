"""Issue 15: adapter folders that change or break while the server runs.

POST /v1/adapters for a loaded adapter whose folder was rewritten reloads it (409 while
requests use it); /v1/models lists only folders that pass the cheap checks and not one that
failed to load until it changes. Runs on the real stories260K Llama and tokenizer.
"""

from __future__ import annotations

import pytest
import torch
from conftest import completion_text
from fastapi.testclient import TestClient
from test_serve_api_audit import CFG, stories, tok  # noqa: F401  (fixtures)
from transformers import GenerationConfig

import paradapt as pa
from paradapt.serve.app import create_app
from paradapt.serve.cache import AdapterPinnedError
from paradapt.serve.engine import Engine
from paradapt.serve.sampling import SamplingParams

BODY = {"model": "lo", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}


def save_random(folder, seed: int):
    """A stories260K model with a random LoRA "lo" (from ``seed``) saved to ``folder``."""
    model = stories()
    torch.manual_seed(seed)
    pa.add_adapter(model, "lo", pa.LoRAConfig(r=4, init="random"))
    pa.save_adapter(model, "lo", folder)
    return model


def greedy_text(model, tok, prompt: str, n: int) -> str:  # noqa: F811
    ids = tok(prompt)["input_ids"]
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=0)
    with pa.route(model, ["lo"]):
        out = model.generate(torch.tensor([ids]), generation_config=gc)[0, len(ids) :].tolist()
    return completion_text(tok, ids, out)


def test_loading_a_changed_folder_again_serves_the_new_weights(tmp_path, tok):  # noqa: F811
    first = save_random(tmp_path / "lo", 1)
    with TestClient(create_app(Engine(stories(), tmp_path, CFG, tokenizer=tok), model_name="stories")) as c:
        assert c.post("/v1/adapters", json={"name": "lo"}).status_code == 200
        old = c.post("/v1/completions", json=BODY).json()["choices"][0]["text"]
        assert old == greedy_text(first, tok, BODY["prompt"], 8)
        second = save_random(tmp_path / "lo", 2)  # rewritten on disk while served
        assert c.post("/v1/adapters", json={"name": "lo"}).status_code == 200
        new = c.post("/v1/completions", json=BODY).json()["choices"][0]["text"]
        assert new == greedy_text(second, tok, BODY["prompt"], 8) and new != old


def test_a_changed_folder_in_use_is_409_and_keeps_its_weights(tmp_path, tok):  # noqa: F811
    save_random(tmp_path / "lo", 1)
    engine = Engine(stories(), tmp_path, CFG, tokenizer=tok)
    engine.load_adapter("lo")
    h = engine.add_request([1, 5, 6], "lo", SamplingParams(max_new_tokens=20, ignore_eos=True))
    engine.step()
    save_random(tmp_path / "lo", 2)
    with pytest.raises(AdapterPinnedError, match="changed on disk"):
        engine.load_adapter("lo")
    engine.run()
    assert h.status == "finished"
    engine.load_adapter("lo")  # free now: reloaded


def test_models_lists_only_folders_that_load(tmp_path, tok):  # noqa: F811
    save_random(tmp_path / "lo", 1)
    save_random(tmp_path / "trunc", 1)
    weights = tmp_path / "trunc" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # passes the cheap checks, fails to load
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "adapter_config.json").write_text("{not json")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "adapter_config.json").write_text("{}")
    with TestClient(create_app(Engine(stories(), tmp_path, CFG, tokenizer=tok), model_name="stories")) as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids == ["stories", "lo", "trunc"]
        assert c.post("/v1/completions", json={**BODY, "model": "trunc"}).status_code == 422
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["stories", "lo"]
        save_random(tmp_path / "trunc", 3)  # fixed on disk: listed again, and loads
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["stories", "lo", "trunc"]
        assert c.post("/v1/completions", json={**BODY, "model": "trunc"}).status_code == 200

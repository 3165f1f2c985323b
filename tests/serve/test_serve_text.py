"""Issue 15's leftovers: the answer's text (incremental detokenization: the first token's leading
space, incomplete characters held back), vLLM's ``return_token_ids`` and
``continuous_usage_stats``, ``echo`` when streaming, a request whose logits go non-finite, strict
encoder requests with token-id inputs, and quiet health probes in the access log.

Runs on the real stories260K Llama and its SentencePiece tokenizer (and SmolLM2's byte-level BPE
tokenizer for the detokenizer), from the shared assets.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import completion_text, tiny_model
from fastapi.testclient import TestClient
from test_serve_api_parity import client, greedy_alone, post, setup  # noqa: F401  (fixtures)
from test_serve_engine import BUSY, adapter_root, alone

import paradapt as pa
from paradapt.serve.app import create_app
from paradapt.serve.detokenize import IncrementalDetokenizer
from paradapt.serve.engine import EncoderEngine, Engine, EngineConfig
from paradapt.serve.runner import NonFiniteLogitsError
from paradapt.serve.sampling import SamplingParams

TEXT = "Once upon a time, 日本 café smiled."  # two 3-byte characters: byte-fallback tokens in stories260K


def _events(client, path: str, body: dict) -> list[dict]:  # noqa: F811
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def _pushed(tok, prompt: list[int], out: list[int]) -> IncrementalDetokenizer:
    d = IncrementalDetokenizer(tok, prompt)
    for t in out:
        d.push(t)
    d.flush()
    return d


# -- 1. text ----------------------------------------------------------------------------------------


def test_the_detokenizer_keeps_leading_spaces_and_holds_incomplete_characters(setup):  # noqa: F811
    _, _, tok = setup
    ids = tok(TEXT)["input_ids"]
    prompt, out = ids[:2], ids[2:]  # "<s> Once" | " upon a time, 日本 ..."
    d = _pushed(tok, prompt, out)
    assert d.text == completion_text(tok, prompt, out) == " upon a time, 日本 café smiled."
    assert tok.decode(out) == "upon a time, 日本 café smiled."  # what decoding alone gave: no space
    assert "".join(d.pieces) == d.text and len(d.pieces) == len(out)
    assert not any("\ufffd" in p for p in d.pieces)  # a character's first bytes are held back...
    assert "日" in d.pieces and d.pieces[d.pieces.index("日") - 1] == ""  # ...until it is complete


def test_the_detokenizer_on_a_byte_level_bpe_tokenizer(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2, local_files_only=True)
    ids = tok("Write about the sea. 🌊 Waves, 日本, naïve café!")["input_ids"]
    for cut in (1, 4, 7):
        d = _pushed(tok, ids[:cut], ids[cut:])
        assert d.text == completion_text(tok, ids[:cut], ids[cut:])
        assert "".join(d.pieces) == d.text and not any("\ufffd" in p for p in d.pieces)
    assert _pushed(tok, ids[:2], ids[2:]).text.startswith(" the")  # its space kept


def test_a_completion_keeps_its_first_space_and_streams_the_same_text(client, setup):  # noqa: F811
    _, ref, tok = setup
    ids = tok("Once")["input_ids"]
    want = greedy_alone(ref, ids, 8, None)  # the base model: " upon a time ..."
    assert tok.convert_ids_to_tokens(want[0]).startswith("\u2581")  # the first token is space-prefixed
    body = {"model": "stories", "prompt": "Once", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    whole = post(client, {**body, "logprobs": 1})["choices"][0]
    assert whole["text"] == completion_text(tok, ids, want) and whole["text"].startswith(" ")
    assert "".join(whole["logprobs"]["tokens"]) == whole["text"]  # token strings add up to the text
    offsets = [len("".join(whole["logprobs"]["tokens"][:i])) for i in range(8)]
    assert whole["logprobs"]["text_offset"] == offsets
    streamed = _events(client, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in streamed) == whole["text"]
    chat = {"model": "stories", "messages": [{"role": "user", "content": "Once"}], "max_tokens": 8}
    chat |= {"temperature": 0, "ignore_eos": True, "logprobs": True}
    answer = post(client, chat, "/v1/chat/completions")["choices"][0]
    assert "".join(e["token"] for e in answer["logprobs"]["content"]) == answer["message"]["content"]
    deltas = [c["choices"][0]["delta"].get("content", "") for c in _events(client, "/v1/chat/completions", chat)]
    assert "".join(deltas) == answer["message"]["content"]


# -- 2. return_token_ids, continuous usage ------------------------------------------------------------


def test_return_token_ids_gives_the_prompt_and_generated_ids(client, setup):  # noqa: F811
    _, ref, tok = setup
    ids = tok("Lily saw a bird")["input_ids"]
    body = {"model": "lo", "prompt": "Lily saw a bird", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    plain = post(client, body)["choices"][0]
    assert "token_ids" not in plain and "prompt_token_ids" not in plain  # only when asked
    got = post(client, {**body, "return_token_ids": True})["choices"][0]
    assert got["prompt_token_ids"] == ids and got["token_ids"] == greedy_alone(ref, ids, 6, "lo")
    chunks = [c["choices"][0] for c in _events(client, "/v1/completions", {**body, "return_token_ids": True})]
    assert chunks[0]["prompt_token_ids"] == ids and all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks for t in c["token_ids"]] == got["token_ids"]
    chat = {"model": "lo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    chat |= {"temperature": 0, "ignore_eos": True, "return_token_ids": True}
    answer = post(client, chat, "/v1/chat/completions")
    assert answer["prompt_token_ids"] and len(answer["choices"][0]["token_ids"]) == 5
    events = _events(client, "/v1/chat/completions", chat)
    assert events[0]["prompt_token_ids"] == answer["prompt_token_ids"]
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == answer["choices"][0]["token_ids"]


def test_continuous_usage_stats_put_usage_on_every_chunk(client):  # noqa: F811
    body = {"model": "lo", "prompt": "Lily saw a bird", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    opts = {"include_usage": True, "continuous_usage_stats": True}
    events = _events(client, "/v1/completions", {**body, "stream_options": opts})
    assert all("usage" in e for e in events)
    counts = [e["usage"]["completion_tokens"] for e in events if e["choices"]]
    assert counts == sorted(counts) and counts[-1] == 6 and events[-1]["usage"]["completion_tokens"] == 6
    only = _events(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert [("usage" in e) for e in only] == [False] * (len(only) - 1) + [True]
    r = client.post(
        "/v1/completions", json={**body, "stream": True, "stream_options": {"continuous_usage_stats": True}}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options.continuous_usage_stats"


# -- 4. echo when streaming ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [0, 5])
def test_echo_streams_the_prompt_first_with_its_logprobs(client, max_tokens):  # noqa: F811
    body = {"model": "lo", "prompt": "Lily saw a bird", "max_tokens": max_tokens, "temperature": 0}
    body |= {"ignore_eos": True, "echo": True, "logprobs": 1}
    whole = post(client, body)["choices"][0]
    events = _events(client, "/v1/completions", body)
    choices = [e["choices"][0] for e in events]
    assert choices[0]["text"] == "Lily saw a bird"  # the prompt's text comes first
    assert "".join(c["text"] for c in choices) == whole["text"]
    parts = [c["logprobs"] for c in choices if c["logprobs"]]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for p in parts for v in p[key]] == whole["logprobs"][key], key
    assert choices[-1]["finish_reason"] == whole["finish_reason"] == "length"


# -- 3. non-finite logits fail only their request --------------------------------------------------------


def test_a_request_whose_logits_go_nan_fails_alone(tmp_path):
    ref = adapter_root(tmp_path, "llama")
    engine = Engine(tiny_model("llama"), tmp_path, BUSY)
    engine.load_adapter("lo2")
    with torch.no_grad():  # the adapter's weights turn NaN after it was checked and loaded
        for p in engine.store.host["lo2"].built[0].parameters():
            p.fill_(float("nan"))
    good = [([5, 6, 7, 8], "lo4", 6), ([9, 10, 11], None, 5), ([12, 13, 14, 15, 16], "par", 7)]
    handles = [engine.add_request(p, a, SamplingParams(max_new_tokens=n)) for p, a, n in good]
    bad = engine.add_request([3, 4, 5], "lo2", SamplingParams(max_new_tokens=4))
    sampled = engine.add_request([3, 4, 5], "lo2", SamplingParams(max_new_tokens=4, temperature=0.8, seed=1))
    engine.run()
    for h in (bad, sampled):
        assert h.status == "failed" and isinstance(h.error, NonFiniteLogitsError), h.error
        assert "lo2" in str(h.error) and "NaN" in str(h.error) and h.tokens == []
    assert [h.tokens for h in handles] == [alone(ref, p, n, a) for p, a, n in good]
    assert all(h.status == "finished" for h in handles)
    assert engine.runner.pages_in_use() == 0 and engine.scheduler.kv_used == 0


def test_only_rows_with_nan_plus_inf_or_nothing_above_minus_inf_are_left_out(tmp_path):
    engine = Engine(tiny_model("llama"), tmp_path, BUSY)
    runner = engine.runner
    seqs = [f"s{i}" for i in range(5)]
    logits = torch.randn(5, 7)
    same, rows = runner._finite_rows(seqs, logits)  # all finite: the one-pass check keeps every row
    assert same == seqs and rows is logits and runner._nonfinite == []
    logits[0, 2] = float("nan")
    logits[1, 4] = float("inf")
    logits[2] = float("-inf")
    logits[3, :6] = float("-inf")  # a masked vocabulary with one token left: fine
    kept, rows = runner._finite_rows([_Seq(s) for s in seqs], logits)
    assert [k.id for k in kept] == ["s3", "s4"] and torch.equal(rows, logits[3:])
    assert [e.request_id for e in runner.take_nonfinite()] == ["s0", "s1", "s2"]


class _Seq:
    def __init__(self, rid: str):
        self.id, self.adapter, self.output = rid, None, []


def test_a_nan_request_is_a_422_naming_the_cause_over_http(tmp_path):
    adapter_root(tmp_path, "llama")
    engine = Engine(tiny_model("llama"), tmp_path, BUSY)
    with TestClient(create_app(engine, model_name="base")) as c:
        assert c.post("/v1/adapters", json={"name": "lo2"}).status_code == 200
        with torch.no_grad():
            for p in engine.store.host["lo2"].built[0].parameters():
                p.fill_(float("nan"))
        r = c.post("/v1/completions", json={"model": "lo2", "prompt": [3, 4, 5], "max_tokens": 3})
        assert r.status_code == 422 and r.json()["error"]["type"] == "non_finite_error", r.text
        body = {"model": "lo2", "prompt": [3, 4, 5], "max_tokens": 3, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as s:
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        assert "NaN" in json.loads(lines[-2][6:])["error"]["message"] and lines[-1] == "data: [DONE]"
        ok = c.post("/v1/completions", json={"model": "lo4", "prompt": [3, 4, 5], "max_tokens": 3})
        assert ok.status_code == 200


# -- 5. encoder requests ----------------------------------------------------------------------------------


def test_encoder_requests_are_strict_and_embeddings_take_token_ids(tmp_path):
    model = tiny_model("bert")
    pa.add_adapter(model, "sent", pa.LoRAConfig(r=4, init="random", head={"labels": ["neg", "pos"]}))
    pa.save_adapter(model, "sent", tmp_path / "sent")

    class Tok:  # characters -> ids
        def __call__(self, text):
            return {"input_ids": [3 + (ord(c) % 90) for c in text]}

    engine = EncoderEngine(tiny_model("bert"), tmp_path, EngineConfig(token_budget=256))
    with TestClient(create_app(engine, model_name="bert", tokenizer=Tok())) as c:
        for path, model_name in (("/classify", "sent"), ("/v1/embeddings", "bert")):
            r = c.post(path, json={"model": model_name, "input": ["fine"], "inputs": ["typo"]})
            assert r.status_code == 400 and r.json()["error"]["param"] == "inputs", r.text
        text = c.post("/v1/embeddings", json={"model": "bert", "input": "fine"}).json()
        ids = Tok()("fine")["input_ids"]
        for form in (ids, [ids]):  # token ids, and a list of token-id lists (OpenAI's forms)
            got = c.post("/v1/embeddings", json={"model": "bert", "input": form}).json()
            assert got["data"][0]["embedding"] == pytest.approx(text["data"][0]["embedding"], abs=1e-6)
            assert got["usage"]["prompt_tokens"] == len(ids)
        r = c.post("/v1/embeddings", json={"model": "bert", "input": [[5, 10**6]]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input"
        r = c.post("/v1/embeddings", json={"model": "bert", "input": "fine", "encoding_format": "base64"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "encoding_format"


# -- 6. the access log ------------------------------------------------------------------------------------


def test_health_probes_stay_out_of_the_access_log(tmp_path, caplog):
    from paradapt.serve.security import GuardConfig

    def lines(guard: GuardConfig) -> list[str]:
        caplog.clear()
        engine = Engine(tiny_model("llama"), None, BUSY)
        with TestClient(create_app(engine, guard=guard)) as c, caplog.at_level(logging.INFO, "paradapt.access"):
            assert c.get("/health").status_code == 200
            c.get("/v1/models")
        return [r.getMessage() for r in caplog.records if r.name == "paradapt.access"]

    quiet = lines(GuardConfig())
    assert not any(ln.startswith("GET /health") for ln in quiet) and any("/v1/models" in ln for ln in quiet)
    assert any(ln.startswith("GET /health 200") for ln in lines(GuardConfig(access_log_health=True)))

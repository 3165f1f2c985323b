"""What real OpenAI/vLLM clients send: batched prompts, n/best_of, log-probabilities and echo,
penalties, logit_bias, min_tokens, include_usage, refused fields, the model card, /tokenize,
/detokenize, /version and vLLM's LoRA endpoints (issue 15).

Runs on the real stories260K Llama and its tokenizer from the shared assets, with one random
LoRA; log-probabilities are checked against a plain forward of the model with that adapter.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CHAT_TEMPLATE, asset_path, completion_text, require_asset
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

import paradapt as pa
from paradapt.serve.app import create_app
from paradapt.serve.engine import Engine, EngineConfig
from paradapt.serve.sampling import SamplingParams

STORIES = asset_path("models", "stories260k-hf")
CFG = EngineConfig(page_size=16, num_blocks=64, token_budget=64, max_running=8, max_slots=2, max_served=3)
ATOL = 1e-4  # fp32: the packed paged forward against a plain forward


def stories():
    require_asset(STORIES)
    return AutoModelForCausalLM.from_pretrained(STORIES, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An adapter root with one random LoRA ("lo"), a reference model carrying it, the tokenizer."""
    root = tmp_path_factory.mktemp("adapters")
    ref = stories()
    torch.manual_seed(0)  # one fixed random LoRA: the answers below do not vary from run to run
    pa.add_adapter(ref, "lo", pa.LoRAConfig(r=4, init="random"))
    pa.save_adapter(ref, "lo", root / "lo")
    return root, ref, AutoTokenizer.from_pretrained(STORIES)


@pytest.fixture(scope="module")
def client(setup):
    root, _, tok = setup
    app = create_app(
        Engine(stories(), root, CFG, tokenizer=tok), model_name="stories", chat_template=CHAT_TEMPLATE
    )
    with TestClient(app) as c:
        yield c


def forward_logits(ref, ids: list[int], adapter: str | None) -> torch.Tensor:
    """``[len(ids), V]`` raw logits of a plain forward (row p predicts token p + 1)."""
    with torch.no_grad(), pa.route(ref, [adapter]):
        return ref(torch.tensor([ids])).logits[0].float()


def forward_logprobs(ref, ids: list[int], adapter: str | None) -> torch.Tensor:
    """``[len(ids), V]`` log-probabilities of a plain forward: the model's distribution."""
    return forward_logits(ref, ids, adapter).log_softmax(-1)


def greedy_alone(ref, ids: list[int], n: int, adapter: str | None, process=None) -> list[int]:
    """Greedy tokens of a plain forward loop; ``process(logits, output)`` changes the logits first."""
    out: list[int] = []
    for _ in range(n):
        logits = forward_logits(ref, ids + out, adapter)[-1]
        logits = process(logits, out) if process else logits
        out.append(int(logits.argmax()))
    return out


def post(client, body: dict, path: str = "/v1/completions"):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


# -- 1. batched prompts ------------------------------------------------------------------------


def test_every_prompt_form_is_served_and_choices_are_indexed_across_prompts(client, setup):
    _, ref, tok = setup
    texts = ["Once upon a time", "The little dog"]
    ids = [tok(t)["input_ids"] for t in texts]
    alone = [completion_text(tok, one, greedy_alone(ref, one, 6, "lo")) for one in ids]
    base = {"model": "lo", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    for prompt in (texts, ids):  # a list of strings, a list of token-id lists
        body = post(client, {**base, "prompt": prompt, "n": 2})
        assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]  # prompt i, choice j: i * n + j
        assert [c["text"] for c in body["choices"]] == [alone[0], alone[0], alone[1], alone[1]]
        n_prompt = sum(map(len, ids))  # each prompt counted once, each choice's tokens counted
        assert 0 <= body["usage"].pop("prompt_tokens_details")["cached_tokens"] < n_prompt
        assert body["usage"] == {
            "prompt_tokens": n_prompt,
            "completion_tokens": 24,
            "total_tokens": n_prompt + 24,
        }
    for prompt in (texts[1], ids[1]):  # one string, one list of token ids
        assert post(client, {**base, "prompt": prompt})["choices"][0]["text"] == alone[1]
    r = client.post("/v1/completions", json={**base, "prompt": [ids[0], []]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


# -- 2. log-probabilities ----------------------------------------------------------------------


def test_echo_scores_every_prompt_token_as_a_plain_forward(client, setup):
    """echo + logprobs + max_tokens 0 (scoring, lm-eval's loglikelihood): the first token's
    logprob is null, every other equals the plain forward's, a prompt longer than one step's
    token budget (chunked prefill) included; the top alternatives are the forward's best."""
    _, ref, tok = setup
    short = tok("Once upon a time there was a cat")["input_ids"]
    long = tok(" ".join(["The little dog ran to the park and saw a big red ball."] * 8))["input_ids"]
    assert len(long) > CFG.token_budget
    body = post(
        client, {"model": "lo", "prompt": [short, long], "echo": True, "logprobs": 3, "max_tokens": 0}
    )
    assert body["usage"]["completion_tokens"] == 0
    for ids, ch in zip((short, long), body["choices"], strict=True):
        lp = ch["logprobs"]
        ref_lp = forward_logprobs(ref, ids, "lo")
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = [float(ref_lp[p - 1, ids[p]]) for p in range(1, len(ids))]
        assert lp["token_logprobs"][1:] == pytest.approx(want, abs=ATOL)
        for p in (1, len(ids) - 1):
            best = sorted(ref_lp[p - 1].topk(3).values.tolist(), reverse=True)
            got = sorted(lp["top_logprobs"][p].values(), reverse=True)[:3]
            assert got == pytest.approx(best, abs=ATOL)
        assert "".join(lp["tokens"]) == ch["text"] == tok.decode(ids)
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]
    r = client.post("/v1/completions", json={"model": "lo", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # 0 only with echo


def test_generated_tokens_logprobs_equal_a_plain_forward_in_completions_and_chat(client, setup):
    _, ref, tok = setup
    ids = tok("Lily saw a bird")["input_ids"]
    body = post(
        client,
        {"model": "lo", "prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 2, "ignore_eos": True},
    )
    gen = greedy_alone(ref, ids, 6, "lo")
    ref_lp = forward_logprobs(ref, ids + gen, "lo")
    want = [float(ref_lp[len(ids) - 1 + i, t]) for i, t in enumerate(gen)]
    lp = body["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == pytest.approx(want, abs=ATOL)
    assert all(len(top) >= 2 for top in lp["top_logprobs"])  # 2 alternatives (+ the chosen one)
    # each token's text as it reads after the prompt (its leading space included)
    assert "".join(lp["tokens"]) == tok.decode(ids + gen)[len(tok.decode(ids)) :]
    # echo with max_tokens 1 (lm-eval's request): the prompt's scores, then the generated token's
    echo = post(
        client, {"model": "lo", "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    )
    assert echo["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [float(ref_lp[p - 1, ids[p]]) for p in range(1, len(ids))] + want[:1], abs=ATOL
    )
    # chat: logprobs true + top_logprobs
    chat = post(
        client,
        {
            "model": "lo",
            "messages": [{"role": "user", "content": "Lily saw a bird"}],
            "max_tokens": 4,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
            "ignore_eos": True,
        },
        "/v1/chat/completions",
    )
    chat_ids = tok(
        tok.apply_chat_template(
            [{"role": "user", "content": "Lily saw a bird"}],
            chat_template=CHAT_TEMPLATE,
            tokenize=False,
            add_generation_prompt=True,
        )
    )["input_ids"]
    gen = greedy_alone(ref, chat_ids, 4, "lo")
    ref_lp = forward_logprobs(ref, chat_ids + gen, "lo")
    content = chat["choices"][0]["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx(
        [float(ref_lp[len(chat_ids) - 1 + i, t]) for i, t in enumerate(gen)], abs=ATOL
    )
    assert all(len(c["top_logprobs"]) == 2 and c["bytes"] == list(c["token"].encode()) for c in content)
    r = client.post(
        "/v1/chat/completions",
        json={"model": "lo", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


# -- 3. n, best_of, penalties, bias, min_tokens, include_usage -----------------------------------


def test_best_of_keeps_the_choice_of_highest_cumulative_logprob(client):
    base = {
        "model": "lo",
        "prompt": "Once upon a time",
        "max_tokens": 5,
        "temperature": 1.0,
        "seed": 7,
        "ignore_eos": True,
    }
    every = post(client, {**base, "n": 4, "logprobs": 0})["choices"]  # choice j draws from seed + j
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in every]
    best = post(client, {**base, "best_of": 4})["choices"]
    assert len(best) == 1 and best[0]["index"] == 0
    assert best[0]["text"] == every[max(range(4), key=lambda j: sums[j])]["text"]
    r = client.post("/v1/completions", json={**base, "n": 3, "best_of": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def vllm_penalties(prompt: list[int], rep: float, presence: float, freq: float):
    """vLLM's penalties, written out: repetition over prompt and output, presence/frequency over the output."""

    def process(logits: torch.Tensor, out: list[int]) -> torch.Tensor:
        logits = logits.clone()
        for t in set(prompt) | set(out):
            logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
        for t in set(out):
            logits[t] -= freq * out.count(t) + presence
        return logits

    return process


def test_penalties_logit_bias_and_min_tokens_act_as_vllm_defines_them(client, setup):
    _, ref, tok = setup
    ids = tok("The cat sat on the mat. The cat")["input_ids"]
    base = {"model": "lo", "prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    pen = {"repetition_penalty": 1.5, "presence_penalty": 0.5, "frequency_penalty": 0.7}
    body = post(client, {**base, **pen})
    want = greedy_alone(ref, ids, 8, "lo", vllm_penalties(ids, 1.5, 0.5, 0.7))
    assert body["choices"][0]["text"] == completion_text(tok, ids, want)
    assert want != greedy_alone(ref, ids, 8, "lo")  # the penalties changed the answer
    forced = post(client, {**base, "logit_bias": {"42": 100}})
    assert forced["choices"][0]["text"] == completion_text(tok, ids, [42] * 8)
    first = greedy_alone(ref, ids, 1, "lo")[0]
    banned = post(client, {**base, "max_tokens": 1, "logit_bias": {str(first): -100}})
    assert banned["choices"][0]["text"] != completion_text(tok, ids, [first])
    eos = tok.eos_token_id
    ended = post(client, {**base, "ignore_eos": False, "logit_bias": {str(eos): 100}, "min_tokens": 3})
    assert ended["usage"]["completion_tokens"] == 4 and ended["choices"][0]["finish_reason"] == "stop"
    for bad in (
        {"7": 101},
        {"99999": 1},
        {"x": 1},
    ):  # bias out of range, id outside the vocabulary, not an id
        r = client.post("/v1/completions", json={**base, "logit_bias": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text


def test_penalized_and_biased_greedy_rows_in_a_busy_batch_equal_each_alone(setup):
    """Per-request processing never reads another row: every request of one busy engine run
    (plain, penalized, biased, min_tokens, sampled) gets the tokens it gets alone."""
    root, _, tok = setup
    ids = tok("The cat sat on the mat. The cat")["input_ids"]
    kinds = [
        SamplingParams(max_new_tokens=8, ignore_eos=True),
        SamplingParams(max_new_tokens=8, repetition_penalty=1.3, frequency_penalty=0.4, ignore_eos=True),
        SamplingParams(max_new_tokens=8, presence_penalty=1.0, logit_bias=((5, 3.0),), ignore_eos=True),
        SamplingParams(max_new_tokens=8, min_tokens=8, logprobs=2),
        SamplingParams(max_new_tokens=8, temperature=0.9, seed=3, frequency_penalty=1.0, ignore_eos=True),
    ]
    engine = Engine(stories(), root, CFG, tokenizer=tok)
    busy = [engine.add_request(ids[: 4 + i], "lo" if i % 2 else None, p) for i, p in enumerate(kinds)]
    engine.run()
    for i, (h, p) in enumerate(zip(busy, kinds, strict=True)):
        solo = Engine(stories(), root, CFG, tokenizer=tok)
        one = solo.add_request(ids[: 4 + i], "lo" if i % 2 else None, p)
        solo.run()
        assert h.tokens == one.tokens, i
        assert [e.logprob for e in h.logprobs] == pytest.approx([e.logprob for e in one.logprobs], abs=ATOL)


def test_streams_carry_every_choice_and_a_final_usage_chunk(client):
    body = {
        "model": "lo",
        "prompt": ["Once upon", "Tom had"],
        "n": 2,
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
    }
    whole = post(client, body)
    with client.stream(
        "POST", "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    ) as r:
        assert r.status_code == 200
        events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    texts = {}
    for c in chunks[:-1]:
        for ch in c["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
    assert [texts[i] for i in range(4)] == [c["text"] for c in whole["choices"]]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        plain = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    assert all("usage" not in c for c in plain)  # no usage chunk unless asked
    r = client.post("/v1/completions", json={**body, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"  # only with stream


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("/v1/completions", {"suffix": "The end."}, "suffix"),
        ("/v1/completions", {"frobnicate": 1}, "frobnicate"),  # unknown: 400, as OpenAI
        ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"parallel_tool_calls": True}, "parallel_tool_calls"),
        ("/v1/chat/completions", {"frobnicate": 1}, "frobnicate"),
    ],
)
def test_fields_not_implemented_are_400_naming_them(client, path, extra, param):
    body = {"model": "lo", "max_tokens": 2}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    r = client.post(path, json={**body, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    off = (
        {"user": "u-1", "tools": None, "response_format": {"type": "text"}}
        if "chat" in path
        else {"user": "u-1", "suffix": None}
    )
    assert client.post(path, json={**body, **off}).status_code == 200  # OpenAI's "off" values are fine


# -- 4. endpoints --------------------------------------------------------------------------------


def test_model_card_tokenize_detokenize_and_version(client, setup):
    _, _, tok = setup
    card = client.get("/v1/models/lo").json()
    assert card["id"] == "lo" and card["object"] == "model" and card["max_model_len"] == 512
    assert all(m["max_model_len"] == 512 for m in client.get("/v1/models").json()["data"])
    assert client.get("/v1/models/stories").json()["id"] == "stories"
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
    ids = tok("Once upon a time")["input_ids"]
    out = client.post("/tokenize", json={"model": "lo", "prompt": "Once upon a time"}).json()
    assert out == {"count": len(ids), "max_model_len": 512, "tokens": ids}
    assert (
        client.post("/tokenize", json={"prompt": "Once", "add_special_tokens": False}).json()["tokens"]
        == tok("Once", add_special_tokens=False)["input_ids"]
    )
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] == len(chat["tokens"]) > 0
    assert client.post("/detokenize", json={"tokens": ids}).json() == {"prompt": tok.decode(ids)}
    assert client.post("/detokenize", json={"tokens": [99999]}).status_code == 400
    assert isinstance(client.get("/version").json()["version"], str)


def test_vllm_lora_endpoints_load_under_another_name_inside_the_root_only(client, setup):
    root = setup[0]
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    want = post(client, {**body, "model": "lo"})["choices"][0]["text"]
    for path in ("lo", str(root / "lo")):  # relative to the root, or absolute inside it
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "renamed", "lora_path": path})
        assert r.status_code == 200 and "renamed" in r.text
        assert post(client, {**body, "model": "renamed"})["choices"][0]["text"] == want
        assert "renamed" in {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "renamed"}).status_code == 200
        assert client.post("/v1/completions", json={**body, "model": "renamed"}).status_code == 404
    for outside in ("/etc", "../", str(root.parent)):
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": outside})
        assert r.status_code == 403 and r.json()["error"]["param"] == "lora_path"
        assert str(root) not in r.text and "/etc" not in r.text  # the server's paths stay private
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "missing"})
    assert r.status_code == 404 and str(root) not in r.text
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "bad/name", "lora_path": "lo"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "never-loaded"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name"


def _events(client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]


def test_streamed_logprobs_add_up_to_the_whole_answers(client):
    """Each chunk carries the log-probabilities of the tokens generated since the previous one."""
    body = {"model": "lo", "prompt": "Lily saw a bird", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    whole = post(client, body)["choices"][0]["logprobs"]
    parts = [c["choices"][0]["logprobs"] for c in _events(client, "/v1/completions", body)]
    parts = [p for p in parts if p]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for p in parts for v in p[key]] == whole[key], key
    chat = {
        "model": "lo",
        "messages": [{"role": "user", "content": "Lily saw a bird"}],
        "max_tokens": 5,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 1,
    }
    whole = post(client, chat, "/v1/chat/completions")["choices"][0]["logprobs"]["content"]
    events = _events(client, "/v1/chat/completions", chat)
    streamed = [e for c in events for e in ((c["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert streamed == whole


def test_tokens_without_text_still_get_their_chunk_as_vllm_sends_them(client, setup):
    """A generated token that adds no text (here BOS, a special token the text skips) still
    streams a chunk with empty text and its token id, as vLLM does: a client timing the first
    token, or the pace of the stream, must not see a stall until text appears."""
    _, _, tok = setup
    bos = tok.bos_token_id
    body = {"model": "lo", "prompt": "Lily saw a bird", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    body |= {"logit_bias": {str(bos): 100}, "return_token_ids": True}
    events = _events(client, "/v1/completions", body)
    choices = [e["choices"][0] for e in events if e.get("choices")]
    assert [c["text"] for c in choices] == [""] * len(choices)
    per_chunk = [c["token_ids"] for c in choices]
    assert sum(per_chunk, []) == [bos] * 4
    assert sum(1 for ids in per_chunk if ids) >= 3  # a chunk as the tokens come, not one at the end

"""Stop strings over the API: a stop string split across two streamed token deltas is never sent,
in part or whole, and the streamed text equals the non-streamed one (completions and chat).

Runs on the real stories260K Llama and its sentencepiece tokenizer from the shared assets.
"""

from __future__ import annotations

import json

import pytest
from conftest import CHAT_TEMPLATE, asset_path, completion_text, require_asset
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from paradapt.serve.app import create_app
from paradapt.serve.engine import Engine, EngineConfig
from paradapt.serve.protocol import ChatMessage, chat_prompt, streamable
from paradapt.serve.sampling import SamplingParams

STORIES = asset_path("models", "stories260k-hf")
CFG = EngineConfig(page_size=16, num_blocks=64, token_budget=64, max_running=8, max_slots=2, max_served=3)
N = 32  # new tokens per request (ignore_eos: every request generates all of them)


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("Once upon a ti", ("time",), "Once upon a "),  # "ti" may become "time": held
        ("Once upon a tin", ("time",), "Once upon a tin"),  # it cannot any more: released
        ("Once upon a time there", ("time",), "Once upon a "),  # present: cut before it
        ("ab x", ("x", "b x"), "a"),  # the earliest of several stop strings cuts
        ("Once t", ("the end", "to"), "Once "),  # the longest possible start is held
        ("Once upon", (), "Once upon"),
        ("half a char \ufffd", (), "half a char "),  # the next byte token completes it
    ],
)
def test_streamable_holds_back_what_may_start_a_stop_string(text, stop, expected):
    assert streamable(text, stop, final=False) == expected
    assert streamable(text, stop, final=True) == text  # done: the engine's text, as it is


def _stories():
    require_asset(STORIES)
    return AutoModelForCausalLM.from_pretrained(STORIES, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def tok():
    _stories()  # skips without the shared assets
    t = AutoTokenizer.from_pretrained(STORIES)
    t.chat_template = CHAT_TEMPLATE  # stories260K has none: chat is refused without one
    return t


def reference_tokens(tok, prompt: str) -> list[int]:
    """The base model's greedy tokens for ``prompt``, no stop strings (the engine alone).

    The base model, not a random adapter: it writes varied English (a random LoRA on a model this
    small repeats one word), so a stop string made across a token boundary occurs only once.
    """
    engine = Engine(_stories(), None, CFG, tokenizer=tok)
    h = engine.add_request(prompt, None, SamplingParams(max_new_tokens=N, ignore_eos=True))
    engine.run()
    return h.tokens


def straddling_stop(tok, prompt: list[int], tokens: list[int]) -> tuple[str, str, int]:
    """A 4-character stop string made of the last 2 characters of one token's text and the first
    2 of the next one's (its first occurrence); returns it, the full text and where it starts."""
    full = completion_text(tok, prompt, tokens)
    ends = [len(completion_text(tok, prompt, tokens[:i])) for i in range(1, len(tokens) + 1)]
    for i in range(2, N - 1):  # not at the very start: text must stream before it
        b = ends[i]
        if (
            b - ends[i - 1] >= 2
            and ends[i + 1] - b >= 2
            and full[: ends[i + 1]].startswith(completion_text(tok, prompt, tokens[: i + 1]))
        ):
            stop = full[b - 2 : b + 2]
            if full.find(stop) == b - 2 and stop.strip():
                return stop, full, b - 2
    pytest.skip("no token boundary with 2 characters on each side in this output")


def _post(client, path: str, body: dict, stream: bool) -> tuple[str, str, list[str]]:
    """(text, finish_reason, streamed deltas) of one request."""
    chat = "chat" in path
    if not stream:
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return (choice["message"]["content"] if chat else choice["text"]), choice["finish_reason"], []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    choices = [json.loads(ln)["choices"][0] for ln in lines[:-1]]
    deltas = [(c["delta"].get("content", "") if chat else c["text"]) for c in choices]
    return "".join(deltas), choices[-1]["finish_reason"], deltas


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_stop_string_across_two_token_deltas_is_never_streamed(tok, path):
    chat = "chat" in path
    messages = [{"role": "user", "content": "Tell me about the little dog"}]
    prompt = chat_prompt(tok, [ChatMessage(**m) for m in messages]) if chat else "Once upon a time"
    stop, full, at = straddling_stop(tok, tok(prompt)["input_ids"], reference_tokens(tok, prompt))
    decoy = stop[:3] + "\u00a7"  # shares the stop string's start, never completes: held, then released
    body = {"model": "stories", "max_tokens": N, "temperature": 0, "ignore_eos": True, "stop": [decoy, stop]}
    body |= {"messages": messages} if chat else {"prompt": prompt}
    app = create_app(Engine(_stories(), None, CFG, tokenizer=tok), model_name="stories")
    with TestClient(app) as client:
        text, reason, _ = _post(client, path, body, stream=False)
        pieces = 0
        for _ in range(5):  # a loaded machine may deliver every token in one delta: stream again
            streamed, sreason, deltas = _post(client, path, body, stream=True)
            assert streamed == text and sreason == "stop"  # nothing of the stop string, nothing after it
            pieces = max(pieces, len([d for d in deltas if d]))
            if pieces > 1:
                break
        whole, _, _ = _post(client, path, {**body, "stop": None}, stream=False)
    assert whole == full  # the reference run and the server agree without stop strings
    assert text == full[:at] and reason == "stop"
    assert pieces > 1  # it did stream in pieces

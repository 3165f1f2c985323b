"""Issue 15: hostile request bodies never make a 5xx (hypothesis, bounded examples).

Bodies for the generation endpoints mix valid fields, wrong types, extreme numbers, odd text
(surrogates, controls, long strings) and unknown keys; whatever arrives, the answer is a
2xx or a 4xx in OpenAI's error shape, and the server keeps serving. Runs on the real
stories260K Llama and tokenizer.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve_api_audit import CFG, root, stories, tok  # noqa: F401  (fixtures)

from paradapt.serve.app import create_app
from paradapt.serve.engine import Engine

TEXT = st.text(st.characters(codec=None, blacklist_categories=()), max_size=40) | st.sampled_from(
    ["\ud800", "x" * 3000, "", "Once upon a time", "\x00\x1b[0m"]
)
NUMBER = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, 1e-300, 2**63, 2**64, -1, 1e308]),
)
JUNK = st.one_of(st.none(), st.booleans(), NUMBER, TEXT, st.lists(st.integers(-5, 600), max_size=5), st.just({}))
MODEL = st.sampled_from(["stories", "lo", "alien", "nope", "../lo", "lo\n", "a" * 300]) | TEXT
GOOD_MODEL = st.sampled_from(["stories", "lo"])
PROMPT = st.one_of(TEXT, st.lists(st.integers(-3, 600), max_size=6), JUNK)
MESSAGES = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]), "content": TEXT}), max_size=3),
    JUNK,
)
OPTIONAL = {
    "max_tokens": st.one_of(st.integers(-2, 6), JUNK),
    "temperature": st.one_of(NUMBER, JUNK),
    "top_p": st.one_of(NUMBER, JUNK),
    "top_k": st.one_of(NUMBER, JUNK),
    "seed": st.one_of(NUMBER, JUNK),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=6), JUNK),
    "stream": st.one_of(st.booleans(), JUNK),
    "n": st.one_of(NUMBER, JUNK),
    "surprise": JUNK,
}
MODELS = st.one_of(GOOD_MODEL, GOOD_MODEL, GOOD_MODEL, MODEL)  # mostly a served model: the rest gets checked
BODIES = {
    "/v1/completions": st.fixed_dictionaries({"model": MODELS, "prompt": PROMPT}, optional=OPTIONAL),
    "/v1/chat/completions": st.fixed_dictionaries({"model": MODELS, "messages": MESSAGES}, optional=OPTIONAL),
}


@pytest.fixture(scope="module")
def client(root, tok):  # noqa: F811
    app = create_app(Engine(stories(), root, CFG, tokenizer=tok), model_name="stories")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("path", list(BODIES))
@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_body_makes_a_5xx(client, path, data):
    body = data.draw(BODIES[path])
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 6:
        body["max_tokens"] = 6  # keep valid requests short
    raw = json.dumps(body, ensure_ascii=True).encode()  # lone surrogates travel as \ud800 escapes
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["type"]
    elif body.get("stream") is True:
        assert r.text.rstrip().endswith("data: [DONE]")

"""Fixes from the review of the merged serving code: bounded detokenizer windows, handles
forgotten when a non-streamed client leaves, aliases fingerprinted by their folder, and the
generation bounds on ``/tokenize``."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from test_serve_api_parity import client, setup  # noqa: F401  (fixtures)

from paradapt.serve.completions import _Choice, _wait
from paradapt.serve.detokenize import MAX_HELD, IncrementalDetokenizer
from paradapt.serve.engine import AdapterStore


def test_the_detokenizer_window_stays_bounded_on_tokens_that_never_make_a_character(setup):  # noqa: F811
    """A run of lone continuation bytes never completes a character: the tokens are released
    (as U+FFFD) once more than MAX_HELD wait, so each step decodes a short window, not all of them."""
    _, _, tok = setup
    byte = tok.convert_tokens_to_ids("<0x80>")
    d = IncrementalDetokenizer(tok, tok("Once")["input_ids"])
    longest = 0
    for _ in range(200):
        d.push(byte)
        longest = max(longest, len(d.ids))  # the window each push decodes
    assert longest <= 2 * MAX_HELD + 2  # the released run stays as context for the next one
    assert len(d.pieces) == 200 and "".join(d.pieces) == d.text and "\ufffd" in d.text


class _Loop:
    def __init__(self):
        self.released, self.cancelled = [], []

    def release(self, handles):
        self.released.append(list(handles))

    def cancel(self, rid):
        self.cancelled.append(rid)


def test_a_client_that_leaves_a_whole_request_has_its_handles_released():
    """``_wait`` returns False when the client has gone; its handles must be forgotten (cancelled
    and dropped), not only cancelled, or every timed-out request stays in the engine's table."""
    loop = _Loop()
    server = SimpleNamespace(loop=loop, engine=SimpleNamespace(pop=None))
    handles = [SimpleNamespace(id=f"r{i}", done=False, error=None) for i in range(3)]
    choices = [_Choice(0, [1], None, h) for h in handles]

    class Gone:
        async def is_disconnected(self):
            return True

    ok = asyncio.run(_wait(server, choices, asyncio.Queue(), Gone(), poll=0.0))
    assert ok is False and loop.released == [handles]


def test_an_alias_is_fingerprinted_by_the_folder_it_serves(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "adapter_config.json").write_text("{}")
    store = AdapterStore(None, tmp_path)
    store.aliases["alias"] = "folder"
    assert store.fingerprint("alias") == store.fingerprint("folder") != ()
    store.mark_failed("alias")
    assert "alias" in store.failed


def test_tokenize_refuses_a_lone_surrogate_and_an_impossible_length(client):  # noqa: F811
    r = client.post(  # JSON's \ud800 escape: valid JSON, not valid Unicode
        "/tokenize", content=b'{"model": "stories", "prompt": "a\\ud800b"}', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = client.post("/tokenize", json={"model": "stories", "prompt": "x" * 5_000_000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_a_request_after_the_engine_thread_stopped_is_a_503_not_a_hang(tmp_path):
    """After the lifespan shutdown nothing steps the engine: a new request is refused at once."""
    import pytest
    from conftest import tiny_model
    from fastapi.testclient import TestClient

    from paradapt.serve.app import create_app
    from paradapt.serve.engine import Engine, EngineConfig
    from paradapt.serve.engine_thread import EngineStoppedError
    from paradapt.serve.protocol import paradapt_error
    from paradapt.serve.sampling import SamplingParams

    app = create_app(Engine(tiny_model("llama"), tmp_path, EngineConfig()), model_name="m")
    with TestClient(app):
        pass  # startup, then shutdown: the engine thread is gone
    loop = app.state.loop
    with pytest.raises(EngineStoppedError):
        asyncio.run(loop.generate([1, 2], None, SamplingParams(max_new_tokens=2), asyncio.Queue()))
    assert paradapt_error(EngineStoppedError("x"), "/v1/completions", True).status_code == 503

"""The server's engine thread (``EngineLoop``): handlers queue commands that run between steps.

Before, a handler took a lock around the engine on the event loop: it blocked the loop for up
to a whole step and the engine thread took the lock straight back, so requests joined about one
per step. These tests pin the behaviour that replaced it. Runs on the real stories260K Llama.
"""

from __future__ import annotations

import asyncio
import threading
import time

from fastapi.testclient import TestClient
from test_serve_api_audit import CFG, root, stories, tok  # noqa: F401  (fixtures)

from paradapt.serve.app import create_app
from paradapt.serve.engine import Engine
from paradapt.serve.engine_thread import EngineLoop


class Idle:
    """The least an EngineLoop needs of an engine: nothing to step, no requests."""

    handles: dict = {}

    def has_work(self) -> bool:
        return False


PAUSE = 0.25  # seconds every step sleeps: requests sent together land inside one step


def slow_engine(root, tok) -> tuple[Engine, list[int]]:  # noqa: F811
    """An engine whose steps take PAUSE longer; records how many requests it knew before each step."""
    engine = Engine(stories(), root, CFG, tokenizer=tok)
    known: list[int] = []
    step = engine.step

    def slow_step():
        s = engine.scheduler
        known.append(len(s.running) + len(s.waiting))
        time.sleep(PAUSE)
        return step()

    engine.step = slow_step
    return engine, known


def test_requests_sent_during_a_step_all_join_the_next_one(root, tok):  # noqa: F811
    engine, known = slow_engine(root, tok)
    n = 6
    go = threading.Barrier(n + 1)
    codes: list[int] = []
    with TestClient(create_app(engine, model_name="stories")) as c:

        def one(max_tokens: int, wait: bool = True) -> None:
            if wait:
                go.wait()
            body = {"model": "lo", "prompt": "Once", "max_tokens": max_tokens, "temperature": 0}
            codes.append(c.post("/v1/completions", json=body).status_code)

        busy = threading.Thread(target=one, args=(12, False))  # keeps the engine stepping
        busy.start()
        while not known:
            time.sleep(0.01)
        short = [threading.Thread(target=one, args=(4,)) for _ in range(n)]
        for t in short:
            t.start()
        go.wait()
        for t in [busy, *short]:
            t.join(60)
    assert codes == [200] * (n + 1)
    # each short request lives ~4 steps: arriving one per step, no step would know all seven
    assert max(known) == n + 1, known


def test_commands_run_in_order_on_the_engine_thread_and_inline_after_shutdown():
    loop_ = EngineLoop(Idle())
    where: list[str] = []
    for i in range(3):
        loop_.post(lambda i=i: where.append(f"{i}:{threading.current_thread().name}"))
    assert loop_.call(lambda: threading.current_thread().name) == "paradapt-engine"
    assert where == [f"{i}:paradapt-engine" for i in range(3)]
    assert asyncio.run(loop_.acall(lambda: 7)) == 7
    loop_._stop = True
    loop_._wake.set()
    loop_._thread.join(5)
    assert loop_.call(lambda: threading.current_thread().name) == threading.current_thread().name


def test_an_error_in_a_command_reaches_its_caller_and_the_thread_goes_on():
    loop_ = EngineLoop(Idle())

    def boom():
        raise ValueError("bad field")

    try:
        loop_.call(boom)
        raise AssertionError("call did not raise")
    except ValueError as e:
        assert "bad field" in str(e)
    assert loop_.call(lambda: 1) == 1 and loop_._thread.is_alive()
    loop_.shutdown()
    assert not loop_._thread.is_alive()

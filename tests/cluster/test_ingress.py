"""The cluster's ingress with fake replica handles, no Ray cluster started: a replica lost under
load (Ray's own exceptions, raised where a ``DeploymentHandle`` raises them) and cluster-wide
admin that fails on one replica.

A fake handle answers ``handle.options(stream=True).forward.remote(fwd)`` with a scripted
stream (a :class:`Head`, body chunks, or an exception at any point) and
``handle.report.remote()`` with a :class:`ReplicaReport`, as the ingress uses a real one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from ray.exceptions import ActorDiedError
from ray.serve.exceptions import ReplicaUnavailableError
from starlette.requests import Request
from starlette.responses import StreamingResponse

from paradapt.cluster.ray_serve import REPLICA_HEADER, Forwarded, Head, Ingress, ReplicaReport, _preamble
from paradapt.cluster.router import AdapterRouter
from paradapt.cluster.state import ReplicaState

JSON = ((b"content-type", b"application/json"),)
SSE = ((b"content-type", b"text/event-stream"),)


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


ROLE = sse({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
TOKEN = sse({"choices": [{"index": 0, "delta": {"content": "Once"}, "finish_reason": None}]})
TEXT = sse({"choices": [{"index": 0, "text": "Once", "finish_reason": None}]})
DONE = b"data: [DONE]\n\n"


def ok_json(obj=None) -> list:
    return [Head(200, JSON), json.dumps(obj or {"ok": True}).encode()]


def error_json(status: int, message: str, param: str | None = None) -> list:
    return [
        Head(status, JSON),
        json.dumps({"error": {"message": message, "type": "x", "param": param}}).encode(),
    ]


class Stream:
    """A ``DeploymentResponseGenerator`` stand-in: yields ``parts``, raising any exception among them."""

    def __init__(self, parts: list):
        self.parts, self.cancelled = list(parts), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if not self.parts:
            raise StopAsyncIteration
        part = self.parts.pop(0)
        if isinstance(part, BaseException):
            raise part
        return part

    def cancel(self) -> None:
        self.cancelled = True


class Method:
    def __init__(self, fn: Callable):
        self.remote = fn


class FakeReplica:
    """A replica's handle: ``answer(fwd)`` scripts each forwarded request's stream."""

    def __init__(self, name: str, answer: Callable[[Forwarded], list], adapters=("a1", "a2")):
        self.name, self.answer, self.adapters = name, answer, frozenset(adapters)
        self.seen: list[Forwarded] = []
        self.streams: list[Stream] = []
        self.report_gate: asyncio.Event | None = None  # set: the report waits for it
        self.restored: list[tuple[str, str]] = []

    def options(self, **_):
        return self

    @property
    def forward(self) -> Method:
        def remote(fwd: Forwarded) -> Stream:
            self.seen.append(fwd)
            stream = Stream(self.answer(fwd))
            self.streams.append(stream)
            return stream

        return Method(remote)

    @property
    def restore(self) -> Method:
        async def restore(name: str, path: str) -> None:
            self.restored.append((name, path))
            self.adapters |= {name}

        return Method(lambda name, path: restore(name, path))

    @property
    def report(self) -> Method:
        async def report() -> ReplicaReport:
            if self.report_gate is not None:
                await self.report_gate.wait()
            return ReplicaReport(ReplicaState(self.name, free_slots=1), "base", self.adapters)

        return Method(lambda: report())


def ingress(*replicas: FakeReplica) -> Ingress:
    return Ingress(list(replicas), [r.name for r in replicas], AdapterRouter())


def request(method: str, path: str, body=None, headers=()) -> Request:
    raw = json.dumps(body).encode() if body is not None else b""
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 5000),
    }

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request(scope, receive)


async def body_of(response) -> bytes:
    if isinstance(response, StreamingResponse):
        return b"".join([c if isinstance(c, bytes) else c.encode() async for c in response.body_iterator])
    return bytes(response.body)


COMPLETION = {"model": "a1", "prompt": "Hi", "max_tokens": 4}


# -- a replica lost under load ------------------------------------------------------------------


def test_a_request_lost_before_answering_is_retried_on_another_replica_and_routing_avoids_it():
    dead = FakeReplica("replica-0", lambda fwd: [ActorDiedError()])
    live = FakeReplica("replica-1", lambda fwd: ok_json({"served": "replica-1"}))

    async def run():
        ing = ingress(dead, live)
        ing.router.choose("a1", ing._snapshots())  # a1 was placed on replica-0 before it died
        assert ing.router.placements("a1") == ("replica-0",)
        first = await ing(request("POST", "/v1/completions", COMPLETION))
        later = [await ing(request("POST", "/v1/completions", COMPLETION)) for _ in range(3)]
        return ing, first, later

    ing, first, later = asyncio.run(run())
    assert first.status_code == 200 and first.headers[REPLICA_HEADER] == "replica-1"
    assert json.loads(first.body) == {"served": "replica-1"}
    assert ing.retries == 1 and "replica-0" in ing.unreachable
    assert len(dead.seen) == 1 and dead.streams[0].cancelled  # the dead one got nothing more
    assert all(r.headers[REPLICA_HEADER] == "replica-1" for r in later)
    assert ing.router.placements("a1") == ("replica-1",) and ing.router.stats.replacements == 1
    assert ing.inflight == {"replica-0": 0, "replica-1": 0}


def test_serve_finding_its_replica_gone_is_retried_too():
    gone = FakeReplica("replica-0", lambda fwd: [ReplicaUnavailableError("replica-0")])
    live = FakeReplica("replica-1", lambda fwd: ok_json())

    async def run():
        ing = ingress(gone, live)
        return ing, [await ing(request("GET", "/health")) for _ in range(4)]

    ing, answers = asyncio.run(run())
    assert [r.status_code for r in answers] == [200] * 4 and ing.retries <= 1
    assert len(gone.seen) <= 1


def test_a_stream_lost_before_its_first_token_is_retried():
    """Chat's role delta is not output: a replica lost after it is still retried, and the client
    sees one clean stream from the other replica."""
    dead = FakeReplica("replica-0", lambda fwd: [Head(200, SSE), ROLE, ActorDiedError()])
    live = FakeReplica("replica-1", lambda fwd: [Head(200, SSE), ROLE, TOKEN, DONE])

    async def run():
        ing = ingress(dead, live)
        ing.router.choose("a1", ing._snapshots())
        chat = {"model": "a1", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
        response = await ing(request("POST", "/v1/chat/completions", chat))
        return ing, response, await body_of(response)

    ing, response, body = asyncio.run(run())
    assert response.headers[REPLICA_HEADER] == "replica-1" and ing.retries == 1
    assert body == ROLE + TOKEN + DONE
    assert ing.inflight == {"replica-0": 0, "replica-1": 0}


def test_a_stream_lost_after_output_fails_only_itself_with_a_clear_error():
    def dying(fwd):
        if json.loads(fwd.body)["prompt"] == "doomed":
            return [Head(200, SSE), TEXT, ActorDiedError()]
        return [Head(200, SSE), TEXT, DONE]

    replica0 = FakeReplica("replica-0", dying)
    replica1 = FakeReplica("replica-1", lambda fwd: [Head(200, SSE), TEXT, DONE])

    async def run():
        ing = ingress(replica0, replica1)
        ing.router.choose("a1", ing._snapshots())  # a1 lives on replica-0
        doomed = await ing(
            request("POST", "/v1/completions", {**COMPLETION, "prompt": "doomed", "stream": True})
        )
        other = await ing(request("POST", "/v1/completions", {**COMPLETION, "stream": True}))
        doomed_body = await body_of(doomed)  # the client reads its stream; the replica dies under it
        other_body = await body_of(other)
        after = await ing(request("POST", "/v1/completions", {**COMPLETION, "stream": True}))
        return ing, doomed, doomed_body, other_body, after, await body_of(after)

    ing, doomed, doomed_body, other_body, after, after_body = asyncio.run(run())
    assert doomed.headers[REPLICA_HEADER] == "replica-0" and ing.retries == 0  # not re-sent
    events = [e for e in doomed_body.split(b"\n\n") if e]
    assert events[0] + b"\n\n" == TEXT and events[-1] == b"data: [DONE]"
    error = json.loads(events[1][6:])["error"]
    assert error["type"] == "server_error" and "replica-0 was lost mid-stream" in error["message"]
    assert other_body == TEXT + DONE  # the other stream on the same replica was not touched
    assert after.headers[REPLICA_HEADER] == "replica-1" and after_body == TEXT + DONE
    assert "replica-0" in ing.unreachable and ing.inflight == {"replica-0": 0, "replica-1": 0}


def test_two_lost_replicas_answer_503_in_openai_shape():
    def lost(name):
        return FakeReplica(name, lambda fwd: [ActorDiedError()])

    async def run():
        ing = ingress(lost("replica-0"), lost("replica-1"), lost("replica-2"))
        return ing, await ing(request("POST", "/v1/completions", COMPLETION))

    ing, response = asyncio.run(run())
    assert response.status_code == 503 and ing.retries == 1  # retried once, not twice
    error = json.loads(response.body)["error"]
    assert error["type"] == "server_error" and "were lost before answering" in error["message"]


def test_a_report_asked_for_before_the_loss_does_not_bring_the_replica_back():
    """A poll in flight when the replica died may return its last (stale) report; only a report
    asked for after the loss (Ray restarted the replica) routes to it again."""
    replica0 = FakeReplica("replica-0", lambda fwd: [ActorDiedError()])
    replica1 = FakeReplica("replica-1", lambda fwd: ok_json())

    async def run():
        ing = ingress(replica0, replica1)
        await ing._poll_all()
        replica0.report_gate = asyncio.Event()
        stale = asyncio.create_task(ing._poll_all())  # asked for before the loss, answers after
        await asyncio.sleep(0)
        response = await ing(request("POST", "/v1/completions", COMPLETION))
        replica0.report_gate.set()
        await stale
        still_down = "replica-0" in ing.unreachable
        await asyncio.sleep(0.01)
        await ing._poll_all()  # Ray restarted it: a fresh report brings it back
        return response, still_down, "replica-0" in ing.unreachable

    response, still_down, down_after = asyncio.run(run())
    assert response.status_code == 200 and still_down and not down_after


def test_preamble_is_only_chats_role_delta():
    assert _preamble(ROLE)
    with_ids = {
        "choices": [{"index": 0, "delta": {"role": "assistant", "token_ids": []}, "finish_reason": None}]
    }
    assert _preamble(sse(with_ids))
    assert not _preamble(TOKEN) and not _preamble(TEXT) and not _preamble(DONE)
    assert not _preamble(sse({"error": {"message": "x"}})) and not _preamble(b": keep-alive\n\n")
    assert not _preamble(sse({"choices": [], "usage": {"total_tokens": 3}}))
    assert not _preamble(ROLE + TOKEN)  # one chunk with both: output


# -- cluster-wide admin, all or nothing ----------------------------------------------------------


def admin_replica(name: str, refuse: dict[tuple[str, str], list] | None = None, adapters=("a1", "a2")):
    """A replica answering admin calls with success, or with ``refuse[(method, path)]``."""

    def answer(fwd: Forwarded) -> list:
        return (refuse or {}).get((fwd.method, fwd.path)) or ok_json({"done": fwd.path})

    return FakeReplica(name, answer, adapters)


KEY = ((b"authorization", b"Bearer k"),)


def test_a_load_refused_on_one_replica_is_unloaded_from_the_others():
    refusal = error_json(404, "unknown adapter 'a3'", "adapter")
    r0, r2 = admin_replica("replica-0"), admin_replica("replica-2")
    r1 = admin_replica("replica-1", {("POST", "/v1/adapters"): refusal})

    async def run():
        ing = ingress(r0, r1, r2)
        return await ing(request("POST", "/v1/adapters", {"name": "a3"}, KEY))

    response = asyncio.run(run())
    assert response.status_code == 404
    error = json.loads(response.body)["error"]
    assert error["param"] == "adapter" and error["type"] == "x"
    assert error["replicas"] == {"replica-0": "undone", "replica-1": "refused", "replica-2": "undone"}
    assert "adapter 'a3'" in error["message"] and "replica-1 refused it" in error["message"]
    for r in (r0, r2):
        undo = r.seen[-1]
        assert (undo.method, undo.path, undo.body) == ("DELETE", "/v1/adapters/a3", b"")
        assert (b"authorization", b"Bearer k") in undo.headers  # the caller's credentials
        assert (b"content-length", b"0") in undo.headers
    assert [f.path for f in r1.seen] == ["/v1/adapters"]  # the refusing replica gets no undo


def test_an_unload_refused_on_one_replica_reloads_a_vllm_alias_from_its_remembered_folder():
    in_use = error_json(409, "adapter 'mine' is in use by 1 running or queued request(s)")
    r0 = admin_replica("replica-0", adapters=("a1", "mine"))
    r1 = admin_replica("replica-1", {("POST", "/v1/unload_lora_adapter"): in_use}, adapters=("a1", "mine"))
    load = {"lora_name": "mine", "lora_path": "/shared/adapters/a1"}

    async def run():
        ing = ingress(r0, r1)
        loaded = await ing(request("POST", "/v1/load_lora_adapter", load))
        unloaded = await ing(request("POST", "/v1/unload_lora_adapter", {"lora_name": "mine"}))
        return ing, loaded, unloaded

    ing, loaded, unloaded = asyncio.run(run())
    assert loaded.status_code == 200 and ing.sources == {"mine": "/shared/adapters/a1"}
    assert unloaded.status_code == 409
    error = json.loads(unloaded.body)["error"]
    assert error["replicas"] == {"replica-0": "undone", "replica-1": "refused"}
    assert error["param"] == "lora_name" and "/shared" not in unloaded.body.decode()
    undo = r0.seen[-1]
    assert (undo.path, json.loads(undo.body)) == ("/v1/load_lora_adapter", load)
    assert ing.sources == {"mine": "/shared/adapters/a1"}  # still loaded everywhere


def test_a_replica_lost_during_a_load_leaves_no_replica_changed():
    r0 = admin_replica("replica-0")
    r1 = FakeReplica("replica-1", lambda fwd: [ActorDiedError()])

    async def run():
        ing = ingress(r0, r1)
        return ing, await ing(request("POST", "/v1/adapters", {"name": "a2"}))

    ing, response = asyncio.run(run())
    error = json.loads(response.body)["error"]
    assert response.status_code == 503 and error["type"] == "server_error" and error["param"] == "name"
    assert error["replicas"] == {"replica-0": "undone", "replica-1": "unreachable"}
    assert r0.seen[-1].method == "DELETE" and "replica-1" in ing.unreachable


def test_an_admin_call_that_holds_everywhere_answers_as_one_server_and_forgets_unloaded_adapters():
    r0, r1 = admin_replica("replica-0"), admin_replica("replica-1")

    async def run():
        ing = ingress(r0, r1)
        ing.router.choose("a1", ing._snapshots())
        response = await ing(request("DELETE", "/v1/adapters/a1"))
        return ing, response

    ing, response = asyncio.run(run())
    assert response.status_code == 200 and json.loads(response.body) == {"done": "/v1/adapters/a1"}
    assert ing.router.placements("a1") == ()
    assert [f.method for f in r0.seen] == ["DELETE"] and [f.method for f in r1.seen] == ["DELETE"]


def test_a_replica_that_lost_a_vllm_alias_gets_it_back_but_not_while_admin_is_changing_it():
    """Ray restarted replica-1: it knows only its root's folders, not the alias loaded
    everywhere before; the next poll loads it again there (an actor call, no HTTP route)."""
    r0 = admin_replica("replica-0", adapters=("a1", "mine"))
    r1 = admin_replica("replica-1", adapters=("a1",))

    async def run():
        ing = ingress(r0, r1)
        ing.sources["mine"] = "a2"
        ing._admin_busy = 1  # a broadcast in flight: a missing alias may be its unload at work
        await ing._poll_all()
        during = list(r1.restored)
        ing._admin_busy = 0
        await ing._poll_all()
        await ing._poll_all()  # restored once, then the report has it
        return during

    assert asyncio.run(run()) == []
    assert r1.restored == [("mine", "a2")] and r0.restored == []


# -- router choice and a planned placement ------------------------------------------------------


def test_a_planned_placement_sends_each_adapter_to_its_planned_replicas_from_the_first_request():
    """Without a plan the first replica by residency/fewest takes a1; with one, a1 goes where the
    plan put it (replica-1) and a replicated a2 spreads over both."""
    r0, r1 = (FakeReplica(n, lambda fwd: ok_json(), adapters=("a1", "a2", "a3")) for n in ("r0", "r1"))
    ing = Ingress([r0, r1], ["r0", "r1"], "adapter", placement=[("a2",), ("a1", "a2")])

    async def go() -> list[str]:
        out = []
        for model in ("a1", "a1", "a2", "a2"):
            response = await ing(request("POST", "/v1/completions", {**COMPLETION, "model": model}))
            out.append(response.headers[REPLICA_HEADER])
        return out

    served = asyncio.run(go())
    assert served[:2] == ["r1", "r1"]
    assert set(served[2:]) <= {"r0", "r1"}
    assert ing.router.placements("a2") == ("r0", "r1") and ing.router.placements("a1") == ("r1",)


def test_the_router_is_chosen_by_name_and_an_unknown_name_is_a_config_error():
    import pytest

    from paradapt.cluster.router import MultiplexRouter, RandomRouter
    from paradapt.errors import ConfigError

    r0 = FakeReplica("r0", lambda fwd: ok_json())
    assert isinstance(Ingress([r0], ["r0"], "multiplex").router, MultiplexRouter)
    assert isinstance(Ingress([r0], ["r0"], "random").router, RandomRouter)
    with pytest.raises(ConfigError, match="router: unknown router 'sticky'"):
        Ingress([r0], ["r0"], "sticky")

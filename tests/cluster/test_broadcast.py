"""Cluster-wide admin, all or nothing, without Ray: what to undo from each replica's answer, and
the error a client gets (OpenAI's shape, each replica's state, no path)."""

from __future__ import annotations

import json

import pytest

from paradapt.cluster.broadcast import (
    STATES,
    AdminCall,
    AdminOp,
    ReplicaAnswer,
    admin_op,
    held_everywhere,
    settle,
    undo_call,
    undo_plan,
)

OK = ReplicaAnswer(200)
GONE = ReplicaAnswer(None)  # the replica died or timed out


def refused(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return ReplicaAnswer(status, {"message": message, "type": kind, "param": param})


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


LOAD = AdminOp("load", "a1", "paradapt", "name")
UNLOAD = AdminOp("unload", "a1", "paradapt", "name")
VLLM_LOAD = AdminOp("load", "mine", "vllm", "lora_name", "/shared/adapters/a1")
VLLM_UNLOAD = AdminOp("unload", "mine", "vllm", "lora_name")


# -- which operation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "raw", "want"),
    [
        ("POST", "/v1/adapters", body(name="a1"), LOAD),
        ("DELETE", "/v1/adapters/a1", b"", UNLOAD),
        ("POST", "/v1/load_lora_adapter", body(lora_name="mine", lora_path="/shared/adapters/a1"), VLLM_LOAD),
        ("POST", "/v1/unload_lora_adapter", body(lora_name="mine"), VLLM_UNLOAD),
        # bodies every replica refuses alike (400): nothing to undo
        ("POST", "/v1/adapters", b"{not json", None),
        ("POST", "/v1/adapters", body(name=3), None),
        ("POST", "/v1/load_lora_adapter", body(lora_name="mine"), None),
        ("POST", "/v1/unload_lora_adapter", b"[]", None),
        ("DELETE", "/v1/adapters/", b"", None),
        ("GET", "/v1/adapters", b"", None),
    ],
)
def test_admin_op_reads_what_the_request_asks(method, path, raw, want):
    assert admin_op(method, path, raw) == want


# -- what undoes what ------------------------------------------------------------------------------


def test_a_load_is_undone_by_an_unload_through_the_same_api():
    assert undo_call(LOAD, {}) == AdminCall("DELETE", "/v1/adapters/a1")
    assert undo_call(VLLM_LOAD, {}) == AdminCall("POST", "/v1/unload_lora_adapter", {"lora_name": "mine"})


def test_a_reload_of_a_known_alias_is_undone_by_loading_its_old_folder_again():
    """load_lora_adapter in place (a new folder under an alias): undo restores the old folder."""
    sources = {"mine": "old-folder"}
    want = AdminCall("POST", "/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": "old-folder"})
    assert undo_call(VLLM_LOAD, sources) == want
    assert undo_call(AdminOp("load", "mine", "paradapt", "name"), sources) == want


def test_an_unload_is_undone_by_loading_it_again_from_its_known_source():
    assert undo_call(UNLOAD, {}) == AdminCall("POST", "/v1/adapters", {"name": "a1"})  # the root folder a1
    sources = {"mine": "a1"}
    want = AdminCall("POST", "/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": "a1"})
    assert undo_call(VLLM_UNLOAD, sources) == want
    assert undo_call(AdminOp("unload", "mine", "paradapt", "name"), sources) == want  # DELETE of an alias
    assert undo_call(VLLM_UNLOAD, {}) is None  # an alias this ingress never saw loaded: no source


def test_undo_encodes_its_json_body():
    assert AdminCall("POST", "/v1/adapters", {"name": "a1"}).encoded() == b'{"name": "a1"}'
    assert AdminCall("DELETE", "/v1/adapters/a1").encoded() == b""


# -- the plan --------------------------------------------------------------------------------------


def test_nothing_is_undone_when_the_call_held_everywhere_or_nowhere():
    assert undo_plan(LOAD, {"r0": OK, "r1": OK}, {}) == {}
    assert undo_plan(LOAD, {"r0": refused(404, "x"), "r1": refused(404, "x")}, {}) == {}


def test_a_load_refused_on_one_replica_is_undone_on_the_others():
    answers = {"r0": OK, "r1": refused(409, "in use"), "r2": OK, "r3": GONE}
    assert undo_plan(LOAD, answers, {}) == {n: AdminCall("DELETE", "/v1/adapters/a1") for n in ("r0", "r2")}


def test_an_unload_refused_on_one_replica_is_loaded_again_on_the_others():
    answers = {"r0": OK, "r1": refused(409, "in use")}
    assert undo_plan(UNLOAD, answers, {}) == {"r0": AdminCall("POST", "/v1/adapters", {"name": "a1"})}
    assert undo_plan(VLLM_UNLOAD, answers, {}) == {}  # no source: nothing can be re-loaded


def test_an_unload_that_finds_nothing_on_some_replicas_holds_everywhere():
    """404 on an unload means the replica never held it: already the wanted state (a retried
    unload converges), but 404 from every replica is the cluster's 404."""
    assert held_everywhere(UNLOAD, {"r0": OK, "r1": refused(404, "unknown adapter 'a1'")})
    assert undo_plan(UNLOAD, {"r0": OK, "r1": refused(404, "unknown")}, {}) == {}
    assert not held_everywhere(UNLOAD, {"r0": refused(404, "unknown"), "r1": refused(404, "unknown")})
    assert not held_everywhere(LOAD, {"r0": OK, "r1": refused(404, "unknown adapter 'a1'")})


# -- the answer ------------------------------------------------------------------------------------


def test_success_everywhere_is_a_success():
    verdict = settle(LOAD, {"r0": OK, "r1": OK}, {}, {})
    assert verdict.ok and verdict.status == 200 and verdict.relay == "r0" and verdict.error is None
    verdict = settle(UNLOAD, {"r0": refused(404, "unknown"), "r1": OK}, {}, {})
    assert verdict.ok and verdict.relay == "r1"  # the replica that did unload it answers


def test_a_call_every_replica_refused_is_answered_as_one_server_would():
    """Nothing changed anywhere (a bad API key, a bad name): the first refusal, as the replica gave it."""
    answers = {"r0": refused(401, "invalid API key"), "r1": refused(401, "invalid API key")}
    verdict = settle(LOAD, answers, undo_plan(LOAD, answers, {}), {})
    assert not verdict.ok and verdict.relay == "r0" and verdict.status == 401 and verdict.error is None
    verdict = settle(
        UNLOAD, {"r0": refused(404, "unknown"), "r1": refused(409, "in use"), "r2": GONE}, {}, {}
    )
    assert verdict.relay == "r1" and verdict.status == 409  # a replica that holds it says why


def test_a_load_undone_everywhere_answers_the_refusal_with_each_replica_state():
    answers = {"r0": OK, "r1": refused(404, "unknown adapter 'a1'", "model", "not_found_error")}
    plan = undo_plan(LOAD, answers, {})
    verdict = settle(LOAD, answers, plan, {"r0": OK})
    assert not verdict.ok and verdict.status == 404
    assert verdict.error["type"] == "not_found_error" and verdict.error["param"] == "model"
    assert verdict.error["replicas"] == verdict.states == {"r0": "undone", "r1": "refused"}
    message = verdict.error["message"]
    assert "'a1'" in message and "r1 refused it (404: unknown adapter 'a1')" in message
    assert "undone on r0" in message and "no replica changed" in message


def test_a_failed_undo_names_the_replicas_that_still_hold_the_adapter():
    answers = {"r0": OK, "r1": OK, "r2": refused(400, "adapter 'a1': bad weights", None)}
    plan = undo_plan(LOAD, answers, {})
    verdict = settle(LOAD, answers, plan, {"r0": OK, "r1": refused(409, "adapter 'a1' is in use")})
    assert verdict.status == 400 and verdict.error["param"] == "name"  # the field naming the adapter
    assert verdict.states == {"r0": "undone", "r1": "loaded", "r2": "refused"}
    assert "still loaded on r1 (409: adapter 'a1' is in use)" in verdict.error["message"]


def test_a_dead_replica_makes_a_503_and_the_others_are_undone():
    answers = {"r0": OK, "r1": GONE}
    verdict = settle(LOAD, answers, undo_plan(LOAD, answers, {}), {"r0": OK})
    assert verdict.status == 503 and verdict.error["type"] == "server_error"
    assert verdict.states == {"r0": "undone", "r1": "unreachable"}
    assert "r1 did not answer" in verdict.error["message"]
    assert set(verdict.states.values()) <= set(STATES)


def test_an_unload_without_a_source_says_where_the_adapter_is_no_longer_served():
    answers = {"r0": OK, "r1": refused(409, "adapter 'mine' is in use by 1 running or queued request(s)")}
    verdict = settle(VLLM_UNLOAD, answers, undo_plan(VLLM_UNLOAD, answers, {}), {})
    assert verdict.status == 409 and verdict.states == {"r0": "unloaded", "r1": "refused"}
    assert "no longer served on r0" in verdict.error["message"]
    assert "/v1/load_lora_adapter" in verdict.error["message"]


def test_a_reload_that_fails_after_a_partial_unload_is_reported():
    answers = {"r0": OK, "r1": refused(409, "in use")}
    plan = undo_plan(UNLOAD, answers, {})
    verdict = settle(UNLOAD, answers, plan, {"r0": GONE})
    assert verdict.states == {"r0": "unloaded", "r1": "refused"}
    assert "could not load it again on r0 (no answer)" in verdict.error["message"]


def test_an_unload_no_replica_holds_is_the_replicas_own_404():
    answers = {n: refused(404, "unknown adapter 'zz'", "adapter", "not_found_error") for n in ("r0", "r1")}
    verdict = settle(UNLOAD, answers, {}, {})
    assert verdict.status == 404 and verdict.relay == "r0" and not verdict.ok
    assert verdict.states == {"r0": "absent", "r1": "absent"}


def test_no_answer_from_any_replica_is_a_503():
    verdict = settle(LOAD, {"r0": GONE, "r1": GONE}, {}, {})
    assert verdict.status == 503 and verdict.relay is None and verdict.error["type"] == "server_error"
    assert "r0 did not answer; r1 did not answer (no replica changed)" in verdict.error["message"]


def test_messages_never_show_the_source_path_and_bound_long_names():
    answers = {
        "r0": OK,
        "r1": refused(403, "lora_path: must name a folder inside the adapter root", "lora_path"),
    }
    verdict = settle(VLLM_LOAD, answers, undo_plan(VLLM_LOAD, answers, {}), {"r0": OK})
    assert "/shared" not in json.dumps(verdict.error)
    assert verdict.status == 403 and verdict.error["param"] == "lora_path"
    long = AdminOp("load", "x" * 5000, "paradapt", "name")
    verdict = settle(long, {"r0": OK, "r1": GONE}, {}, {})
    assert len(verdict.error["message"]) < 500

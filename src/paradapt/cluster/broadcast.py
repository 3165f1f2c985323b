"""Cluster-wide admin, all or nothing: what to undo when a load or unload fails on some replicas.

Behind ``paradapt serve --replicas N`` the ingress sends each admin request (``POST
/v1/adapters``, ``DELETE /v1/adapters/{name}``, vLLM's ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``) to every replica. Without an undo, one refusal (a folder one node
cannot see, an adapter in use on one replica, a replica that dies) left the others changed: the
cluster then served a name on some replicas and 404'd it on others, and a retry of the same
request met different answers on different replicas. vLLM behind Ray Serve users expect an
admin call to hold everywhere or nowhere, so:

* **A load** that fails on any replica is undone where it succeeded: unloaded again, or, for a
  name the ingress knows as a vLLM alias, re-loaded from the folder it named before (a
  ``load_lora_adapter`` in place keeps the old folder when the new one fails somewhere).
* **An unload** refused by any replica is undone where it succeeded by loading the adapter
  again, which needs its source: an adapter-root folder of that name (``DELETE /v1/adapters``)
  is always known; a vLLM alias (``lora_name`` -> ``lora_path``) is known only if this ingress
  broadcast its load (it remembers the path of every alias it loaded everywhere). Without a
  source the replicas that unloaded it stay so, and the answer names them.
* A replica answering **404 to an unload** never had the adapter: it is already in the wanted
  state, so an unload that succeeds elsewhere succeeds (a retried unload converges); 404 from
  every replica is the cluster's 404.
* An undo can itself fail (a request started using the adapter in between): the answer then
  names each replica's state, so the operator knows exactly where to repeat the call.

Every failure is answered in OpenAI's error shape with ``param`` naming the field at fault (the
refusing replica's own, else the field that names the adapter) and ``replicas`` mapping each
replica to its :data:`STATES` entry; messages name the adapter and the replicas, never a path
(the refusals quoted are the replicas' own, already redacted, and ``lora_path`` is never
echoed). Pure logic, tested without Ray; :mod:`paradapt.cluster.ray_serve` sends the calls.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

#: Each replica's state after a failed admin call (the ``replicas`` map of the error body).
STATES = {
    "loaded": "the adapter is loaded there (the load succeeded and its undo failed)",
    "unloaded": "the adapter is unloaded there (the unload succeeded and could not be undone)",
    "undone": "the change succeeded there and was undone: the replica is as before the call",
    "refused": "the replica refused the call (the quoted error): it is as before the call",
    "absent": "an unload found no such adapter there (404): it never held it",
    "unreachable": "the replica did not answer (it died or timed out); a restarted replica holds only its folders",
}
#: The longest adapter name quoted in a message (names come from clients).
_NAME_SHOWN = 80


@dataclass(frozen=True)
class AdminCall:
    """An admin HTTP request the ingress sends to one replica: method, path and JSON body."""

    method: str
    path: str
    body: dict | None = None

    def encoded(self) -> bytes:
        return json.dumps(self.body).encode() if self.body is not None else b""


@dataclass(frozen=True)
class AdminOp:
    """What a cluster-wide admin request does: ``kind`` ``adapter`` through ``api``.

    ``field``: the request field that names the adapter (what an error's ``param`` names);
    ``source``: a vLLM load's ``lora_path`` as the client sent it (kept to undo an unload, never
    echoed in a message)."""

    kind: Literal["load", "unload"]
    adapter: str
    api: Literal["paradapt", "vllm"]
    field: str
    source: str | None = None


@dataclass(frozen=True)
class ReplicaAnswer:
    """One replica's answer: its HTTP status (None: no answer, the replica died or timed out) and
    the ``error`` object of its OpenAI-shaped error body, if any."""

    status: int | None
    error: Mapping | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(frozen=True)
class Verdict:
    """The cluster's answer to an admin call: ``relay`` names the replica whose own answer to
    pass on (the call held everywhere, or changed nothing anywhere: then the single-process
    server's answer is the right one), else ``error`` is the OpenAI error object to answer with
    ``status``. ``states``: each replica's :data:`STATES` entry when it did not hold everywhere."""

    status: int
    states: dict[str, str]
    relay: str | None = None
    error: dict | None = None

    @property
    def ok(self) -> bool:
        """Did the call hold on every replica?"""
        return self.relay is not None and self.status < 300


def _json(body: bytes) -> dict | None:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _str(body: dict | None, key: str) -> str | None:
    value = (body or {}).get(key)
    return value if isinstance(value, str) else None


def admin_op(method: str, path: str, body: bytes) -> AdminOp | None:
    """The admin operation a broadcast request asks for; None when its body does not say (every
    replica then refuses it alike, with the same 400, and there is nothing to undo)."""
    if method == "DELETE" and path.startswith("/v1/adapters/"):
        name = path[len("/v1/adapters/") :]
        return AdminOp("unload", name, "paradapt", "name") if name else None
    if method != "POST":
        return None
    parsed = _json(body)
    if path == "/v1/adapters" and (name := _str(parsed, "name")) is not None:
        return AdminOp("load", name, "paradapt", "name")
    if path == "/v1/load_lora_adapter":
        name, source = _str(parsed, "lora_name"), _str(parsed, "lora_path")
        return AdminOp("load", name, "vllm", "lora_name", source) if name is not None and source else None
    if path == "/v1/unload_lora_adapter" and (name := _str(parsed, "lora_name")) is not None:
        return AdminOp("unload", name, "vllm", "lora_name")
    return None


def _load_call(name: str, sources: Mapping[str, str]) -> AdminCall:
    """Load ``name`` back: from its remembered vLLM folder if it is an alias, else its root folder."""
    if name in sources:
        return AdminCall("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": sources[name]})
    return AdminCall("POST", "/v1/adapters", {"name": name})


def undo_call(op: AdminOp, sources: Mapping[str, str]) -> AdminCall | None:
    """The request that takes ``op`` back on a replica where it succeeded; None when impossible.

    ``sources``: the vLLM aliases this ingress loaded everywhere (name -> ``lora_path``). Undoing
    a load restores the alias a name had (an in-place reload of an alias), else unloads it
    (through the same API, so an alias is dropped with its name); undoing an unload loads it
    again from its alias's folder, or from the root folder of that name (paradapt's API only:
    vLLM's unload of an alias the ingress never saw loaded has no known source).
    """
    if op.kind == "load":
        if op.adapter in sources:
            return _load_call(op.adapter, sources)
        if op.api == "vllm":
            return AdminCall("POST", "/v1/unload_lora_adapter", {"lora_name": op.adapter})
        return AdminCall("DELETE", f"/v1/adapters/{op.adapter}")
    if op.adapter in sources or op.api == "paradapt":
        return _load_call(op.adapter, sources)
    return None


def _done(op: AdminOp, answer: ReplicaAnswer) -> bool:
    """Is the replica in the wanted state: it succeeded, or an unload found nothing to unload."""
    return answer.ok or (op.kind == "unload" and answer.status == 404)


def held_everywhere(op: AdminOp, answers: Mapping[str, ReplicaAnswer]) -> bool:
    """Did ``op`` hold on every replica (an unload: at least one really unloaded it)?"""
    return all(_done(op, a) for a in answers.values()) and any(a.ok for a in answers.values())


def undo_plan(
    op: AdminOp, answers: Mapping[str, ReplicaAnswer], sources: Mapping[str, str]
) -> dict[str, AdminCall]:
    """The undo request for each replica where ``op`` succeeded, when it did not hold everywhere
    (empty when it did, when it succeeded nowhere, or when no undo is possible)."""
    if held_everywhere(op, answers):
        return {}
    call = undo_call(op, sources)
    if call is None:
        return {}
    return {name: call for name, a in answers.items() if a.ok}


def _shown(name: str) -> str:
    return repr(name if len(name) <= _NAME_SHOWN else name[:_NAME_SHOWN] + "...")


def _why(answer: ReplicaAnswer) -> str:
    """A refusal in a few words: its status and the replica's own (redacted) message."""
    if answer.status is None:
        return "no answer"
    message = (answer.error or {}).get("message")
    return f"{answer.status}: {message}" if isinstance(message, str) and message else str(answer.status)


def _list(names: list[str]) -> str:
    return ", ".join(names)


def settle(
    op: AdminOp,
    answers: Mapping[str, ReplicaAnswer],
    plan: Mapping[str, AdminCall],
    undone: Mapping[str, ReplicaAnswer],
) -> Verdict:
    """The cluster's answer from the replicas' ``answers`` to ``op`` (in replica order), the undo
    ``plan`` sent and the ``undone`` answers to it.

    Held everywhere: relay the first success. Succeeded nowhere (every replica refused it, or an
    unload no replica holds): relay the first refusal as the replica gave it, since nothing
    changed (a bad API key or a bad name is then answered exactly as by one server). Otherwise
    a composed error: the first refusal's status (503 when the only failures are replicas that
    did not answer), its ``type`` and ``param`` (else ``op.field``), a message naming the
    adapter, each refusal and what became of the replicas that had changed, and ``replicas``.
    """
    if held_everywhere(op, answers):
        first = next(n for n, a in answers.items() if a.ok)
        return Verdict(answers[first].status or 200, {}, relay=first)
    states = {
        name: _state(op, a, name in plan and undone.get(name, ReplicaAnswer(None)).ok)
        for name, a in answers.items()
    }
    refusals = [(n, a) for n, a in answers.items() if not _done(op, a)]
    refusal = next((n for n, a in refusals if a.status is not None), None)
    if not any(a.ok for a in answers.values()):  # nothing changed anywhere
        first = refusal or next((n for n, a in answers.items() if a.status is not None), None)
        if first is not None:
            return Verdict(answers[first].status or 503, states, relay=first)
    status = (answers[refusal].status or 503) if refusal is not None else 503
    verb = "loaded" if op.kind == "load" else "unloaded"
    why = "; ".join(
        f"{n} did not answer" if a.status is None else f"{n} refused it ({_why(a)})" for n, a in refusals
    )
    message = f"adapter {_shown(op.adapter)} was not {verb} on every replica: {why}"
    message += _aftermath(op, states, plan, undone)
    error = dict(answers[refusal].error or {}) if refusal is not None else {}
    return Verdict(status, states, error=_error(status, message, error, op, states))


def _state(op: AdminOp, answer: ReplicaAnswer, undone: bool) -> str:
    """One replica's :data:`STATES` entry after a failed call."""
    if answer.status is None:
        return "unreachable"
    if op.kind == "unload" and answer.status == 404:
        return "absent"
    if not answer.ok:
        return "refused"
    if undone:
        return "undone"
    return "loaded" if op.kind == "load" else "unloaded"


def _error(status: int, message: str, refusal: Mapping, op: AdminOp, states: dict[str, str]) -> dict:
    """OpenAI's error object, with each replica's state: the refusal's type and field if it named them."""
    kind = refusal.get("type") if status < 500 and isinstance(refusal.get("type"), str) else None
    if kind is None:
        kind = {404: "not_found_error"}.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
    param = refusal.get("param") if isinstance(refusal.get("param"), str) else op.field
    return {"message": message, "type": kind, "param": param, "replicas": dict(states)}


def _aftermath(
    op: AdminOp, states: Mapping[str, str], plan: Mapping[str, AdminCall], undone: Mapping[str, ReplicaAnswer]
) -> str:
    """What became of the replicas where ``op`` had succeeded: undone, or why they keep the change."""
    out = ""
    if back := [n for n, s in states.items() if s == "undone"]:
        out += f"; undone on {_list(back)}"
    kept = [n for n, s in states.items() if s in ("loaded", "unloaded")]
    if not kept:
        return out + " (no replica changed)"
    failed = [f"{n} ({_why(undone.get(n, ReplicaAnswer(None)))})" for n in kept if n in plan]
    if op.kind == "load":
        return out + f"; still loaded on {_list(failed)}: unload it again once its requests finish"
    if failed:
        return out + f"; could not load it again on {_list(failed)}: those replicas do not serve it now"
    return out + (
        f"; no longer served on {_list(kept)} (this ingress never saw the folder it was loaded from: "
        "load it again there with /v1/load_lora_adapter)"
    )

"""CPU time of a server's process tree by role (paradapt.cluster.cpu), on a made-up /proc."""

from __future__ import annotations

import os

import pytest

from paradapt.cluster.cpu import cpu_by_role, cpu_seconds, descendants, role_of

TICK = os.sysconf("SC_CLK_TCK")


def fake(proc, pid, title, utime, stime, children=(), comm="python (x)"):
    d = proc / str(pid)
    (d / "task" / str(pid)).mkdir(parents=True)
    # the comm may hold spaces and parentheses: the fields start after the last ")"
    (d / "stat").write_text(f"{pid} ({comm}) S 1 1 1 0 -1 4194560 10 0 0 0 {utime} {stime} 0 0 20 0 1 0\n")
    (d / "cmdline").write_bytes(title.replace(" ", "\0").encode() + b"\0")
    (d / "task" / str(pid) / "children").write_text(" ".join(str(c) for c in children))


def test_roles_sum_the_tree_by_serve_deployment(tmp_path):
    fake(tmp_path, 10, "python -m paradapt.cli serve --replicas 2", 2 * TICK, TICK, children=(11, 12))
    fake(tmp_path, 11, "raylet --node", TICK, 0, children=(13, 14, 15))
    fake(tmp_path, 12, "gcs_server", TICK, TICK)
    fake(tmp_path, 13, "ray::ServeReplica:paradapt:replica-0.handle_request", 30 * TICK, 2 * TICK)
    fake(tmp_path, 14, "ray::ServeReplica:paradapt:ingress.handle_request", 5 * TICK, TICK)
    fake(tmp_path, 15, "ray::ProxyActor", 3 * TICK, 0)
    fake(tmp_path, 99, "ray::ServeReplica:paradapt:replica-1", 50 * TICK, 0)  # not in the tree
    assert descendants(10, tmp_path) == [10, 11, 12, 13, 14, 15]
    got = cpu_by_role(10, tmp_path)
    assert got == pytest.approx({"ray": 3 + 1 + 2 + 3, "replica-0": 32, "ingress": 6})
    assert cpu_seconds(404, tmp_path) is None  # gone: left out


def test_a_comm_with_parentheses_does_not_shift_the_fields(tmp_path):
    fake(tmp_path, 7, "x", 4 * TICK, TICK, comm="a) (b")
    assert cpu_seconds(7, tmp_path) == pytest.approx(5.0)


def test_role_of_a_title():
    assert role_of("ray::ServeReplica:paradapt:replica-3.handle_request_with_rejection") == "replica-3"
    assert role_of("ray::ServeReplica:app:ingress") == "ingress"
    assert role_of("ray::ServeController") == "ray"


def test_this_process_reads_its_own_cpu():
    assert cpu_seconds(os.getpid()) > 0
    assert set(cpu_by_role(os.getpid())) >= {"ray"}

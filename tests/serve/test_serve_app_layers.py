"""The HTTP layer speaks to the engine through its public methods (issue 14).

``serve/app.py``, ``engine_thread.py``, ``metrics.py`` and ``protocol.py`` never call an
engine's private methods nor reach into its scheduler: the admin operations (load, unload,
discard, fail) and the queue counts are the engine's own public methods, so the engine can
change its insides without breaking the server.
"""

from __future__ import annotations

import ast
from pathlib import Path

import paradapt.serve as serve

HTTP_LAYER = ("app.py", "engine_thread.py", "metrics.py", "protocol.py")


def _is_engine(node: ast.expr) -> bool:
    """``engine`` or ``<anything>.engine`` (``self.engine``, ``server.engine``, ``loop_.engine``)."""
    return (isinstance(node, ast.Name) and node.id == "engine") or (
        isinstance(node, ast.Attribute) and node.attr == "engine"
    )


def test_the_http_layer_uses_only_the_engines_public_surface():
    root = Path(serve.__file__).parent
    seen = 0
    for name in HTTP_LAYER:
        for node in ast.walk(ast.parse((root / name).read_text())):
            if isinstance(node, ast.Attribute) and _is_engine(node.value):
                seen += 1
                assert not node.attr.startswith("_"), f"{name}:{node.lineno} uses engine.{node.attr}"
                assert node.attr != "scheduler", f"{name}:{node.lineno} reaches into engine.scheduler"
    assert seen > 10  # the check does look at the engine calls


def test_no_module_is_named_api_in_serve():
    """``paradapt/serve/api.py`` was split (app, engine_thread, protocol, metrics); no shim."""
    assert not (Path(serve.__file__).parent / "api.py").exists()

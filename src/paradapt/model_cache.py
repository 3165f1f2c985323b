"""Converted model folders in the user's cache: built once, written atomically, checked on use.

A named model that ships in a form transformers cannot load fast (SmolLM2 as a quantized GGUF)
is converted once to a plain Hugging Face folder. Conversion takes tens of seconds, loading the
result takes about one, so the folder is kept under :func:`cache_root`. A conversion killed
half-way must never leave a folder that looks usable: the converter writes into a temporary
sibling folder, a manifest (every file and its size, and the fingerprint of the source it was
built from) is written last, and only then is the folder renamed into place. On use, a folder
whose manifest is missing, unreadable, built from another source, or whose files are missing or
of another size, is moved aside and rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

from .errors import SetupError
from .files import write_text_atomic

CACHE_ENV = "PARADAPT_CACHE"
MANIFEST = "paradapt-manifest.json"
MANIFEST_FORMAT = 1
_TMP = ".tmp-"  # temporary build folders: <target>.tmp-<pid>-<random>
_STALE = ".stale-"  # folders moved aside before deletion


def cache_root() -> Path:
    """``$PARADAPT_CACHE``, else ``$XDG_CACHE_HOME/paradapt``, else ``~/.cache/paradapt``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "paradapt"


def folder_problem(folder: Path, fingerprint: dict) -> str | None:
    """Why ``folder`` is not a complete build of the source ``fingerprint`` names (None: it is)."""
    if not folder.is_dir():
        return "not built yet"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {MANIFEST} (a conversion did not finish)"
    except (OSError, ValueError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return f"{MANIFEST} has another format"
    if manifest.get("source") != fingerprint:
        return "it was built from another source file"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MANIFEST} lists no files"
    for name, size in files.items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not {size}"
    return None


def _write_manifest(folder: Path, fingerprint: dict) -> None:
    """List every file the build wrote (relative path -> size), then the manifest itself."""
    files = {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    if not files:
        raise SetupError(f"the conversion into {folder.name} wrote no files")
    text = json.dumps({"format": MANIFEST_FORMAT, "source": fingerprint, "files": files}, indent=2)
    write_text_atomic(folder / MANIFEST, text, durable=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _sweep(target: Path) -> None:
    """Delete leftovers of earlier builds of ``target``: folders moved aside, and temporary
    folders whose building process is gone (killed mid-conversion)."""
    for p in target.parent.glob(target.name + ".*"):
        suffix = p.name[len(target.name) :]
        if suffix.startswith(_STALE):
            shutil.rmtree(p, ignore_errors=True)
        elif suffix.startswith(_TMP):
            pid = suffix[len(_TMP) :].split("-")[0]
            if not pid.isdigit() or not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)


def _move_aside(folder: Path) -> None:
    if folder.exists():
        aside = folder.with_name(f"{folder.name}{_STALE}{uuid.uuid4().hex[:8]}")
        try:
            folder.rename(aside)
        except FileNotFoundError:  # another process moved it first
            return
        shutil.rmtree(aside, ignore_errors=True)


def cached_folder(
    target: Path,
    fingerprint: dict,
    build: Callable[[Path], None],
    *,
    rebuild: bool = False,
) -> tuple[Path, bool]:
    """``target`` built by ``build(folder)`` from the source ``fingerprint`` names, and whether it
    was built now.

    A complete folder is returned as is (unless ``rebuild``). Otherwise ``build`` writes into a
    fresh temporary folder next to ``target``; the manifest is written, and the folder renamed
    into place, only once ``build`` returned. An error inside ``build`` removes the temporary
    folder and propagates. Two processes converting at once both build; the first rename wins
    and the other's folder is dropped.
    """
    problem = None if rebuild else folder_problem(target, fingerprint)
    if not rebuild and problem is None:
        return target, False
    if target.exists() and problem is not None:
        warnings.warn(f"cached model folder {target.name}: {problem}; converting it again", stacklevel=2)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SetupError(
            f"cannot create the model cache folder {target.parent} ({e.strerror}); set {CACHE_ENV}"
        ) from None
    _sweep(target)
    tmp = target.with_name(f"{target.name}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        build(tmp)
        _write_manifest(tmp, fingerprint)
        _move_aside(target)  # an incomplete or outdated folder: out of the way, then deleted
        try:
            tmp.rename(target)
        except OSError:  # another process renamed its build into place first
            if folder_problem(target, fingerprint) is not None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, True


__all__ = ["CACHE_ENV", "MANIFEST", "cache_root", "cached_folder", "folder_problem"]

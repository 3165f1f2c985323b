"""Locating and loading what paradapt runs on: the shared assets folder, the default model, a
local Hugging Face model folder, the demo's sentences.

Library code (``paradapt.train``, the twin's profiler) and the command line share these. Errors
are :class:`~paradapt.errors.ParadaptError`\\ s that name the setting at fault (``--model: ...``,
``PARADAPT_ASSETS=...``). Nothing here touches the environment: models load offline because every
``from_pretrained`` call passes ``local_files_only=True``, not because ``HF_HUB_OFFLINE`` is set
(only ``paradapt.cli.main`` sets that, for the command-line process).
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError, SetupError, one_line
from .models import DEFAULT_MODEL_PACKAGE, MODEL_FIELD, default_model_dir, named_model, resolve_model

ASSETS_ENV = "PARADAPT_ASSETS"

# Used when the shared SST-2 file is not there.
BUILTIN_SENTENCES = [
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "the acting , costumes , music , cinematography and sound are all astounding .",
    "it 's slow -- very , very slow .",
    "Once upon a time, there was a little girl named Lily.",
    "One day, a big dog ran to the park and saw a cat sitting in a tree.",
    "a sometimes tedious film .",
    "Tom had a red ball.",
]


# -- locating things ---------------------------------------------------------------------------


def find_assets() -> Path | None:
    """The shared assets folder: ``$PARADAPT_ASSETS``, else ``shared/assets`` found walking up
    from the current directory and from this file (the repository's ``../shared/assets``)."""
    env = os.environ.get(ASSETS_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise SetupError(f"{ASSETS_ENV}={env}: no such folder")
        return path
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "assets"
            if candidate.is_dir():
                return candidate
    return None


def load_sentences(n: int) -> tuple[list[str], str]:
    """``n`` sentences from the shared SST-2 test split if present, else the built-in ones;
    and where they came from."""
    assets = find_assets()
    tsv = assets / "data" / "sst2" / "test.tsv" if assets is not None else None
    pool, source = BUILTIN_SENTENCES, "built-in sentences"
    if tsv is not None and tsv.is_file():
        with open(tsv, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
        found = [r[0].strip() for r in rows if r and r[0].strip()]
        if found:
            pool, source = found, str(tsv)
    return [pool[i % len(pool)] for i in range(n)], source


# -- loading a model ---------------------------------------------------------------------------


def _causal_lm_classes() -> set[str]:
    """Class names ``AutoModelForCausalLM`` builds (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ([v] if isinstance(v, str) else v)}


def load_model(
    model: str | Path, *, quantize: str = "none", group_size: int | None = None, lm_head: str | None = None
) -> tuple[Any, Any]:
    """Tokenizer and model of ``model``: a named model (``smollm2-135m-instruct``, see
    :mod:`paradapt.models`) or a local Hugging Face folder; never from the network. Causal LMs
    keep their head; float32, eval mode, the tokenizer padding on the right.

    ``quantize`` (``int4``, ``int8``, ``bf16``; ``group_size`` for int4) gives the base in that
    precision, as :func:`paradapt.quantize` would. A named model that ships in 4 bits (SmolLM2's
    GGUF) loads ``int4`` in groups of 32 from its own blocks (:mod:`paradapt.gguf_weights`),
    never through float32; anything else is loaded in float32 and quantised. ``lm_head``
    (``int8``, ...) quantises the LM head too (:func:`paradapt.quantized.quantize_lm_head`).

    A named model's cached conversion that passes its manifest check but still fails to load
    (a file corrupted in place) is converted again, once. A named model's config says its name
    as ``_name_or_path``, so the adapters saved on it name their base portably.
    """
    from .quantized import quantize as quantize_model
    from .quantized import quantize_lm_head

    if lm_head is not None and quantize == "none":
        raise ConfigError("lm_head", "quantising the LM head needs a quantised base (quantize=...)")
    entry = named_model(model)
    if quantize == "int4" and group_size in (None, 32) and entry is not None and entry.locate_int4:
        tok, loaded = _load_named_int4(entry)
    else:
        tok, loaded = _load_float(model, entry)
        if quantize != "none":
            quantize_model(loaded, quantize, group_size)
    if lm_head is not None:
        quantize_lm_head(loaded, lm_head)
    return tok, loaded


def _load_float(model: str | Path, entry) -> tuple[Any, Any]:
    rebuild = entry is not None and entry.cached  # a plain folder, or a package's own: no rebuild
    tok, loaded = _rebuilt_once(lambda again: resolve_model(model, rebuild=again), _load_folder, rebuild)
    if entry is not None:  # adapter files record the base by its name, not this machine's cache path
        loaded.config._name_or_path = entry.name
    return tok, loaded


def _load_named_int4(entry) -> tuple[Any, Any]:
    """A named model's int4 folder, converted once from its GGUF; rebuilt once if it fails."""
    from .errors import QuantizationError
    from .quantized_io import load_quantized

    def locate(again: bool) -> Path:
        try:
            return entry.locate_int4(again)
        except (SetupError, QuantizationError) as e:
            raise SetupError(f"{MODEL_FIELD} {entry.name}: {e}") from None

    tok, loaded = _rebuilt_once(locate, lambda path: (_load_tokenizer(path), load_quantized(path)), True)
    loaded.config._name_or_path = entry.name
    return tok, loaded


def _rebuilt_once(locate: Callable[[bool], Path], load: Callable[[Path], Any], rebuild: bool) -> Any:
    """``load(locate(False))``; a cached conversion that passes its manifest check but does not
    load (a file corrupted in place) is converted again (``locate(True)``), once, with a warning."""
    from .errors import QuantizationError

    path = locate(False)
    try:
        return load(path)
    except (ConfigError, QuantizationError) as e:
        if not rebuild:
            raise
        warnings.warn(f"cached model folder {path.name} does not load ({e}); converting it again", stacklevel=4)
        return load(locate(True))


def _load_folder(path: Path) -> tuple[Any, Any]:
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not path.is_dir():
        raise ConfigError(MODEL_FIELD, f"{path} is not a folder")
    if not (path / "config.json").is_file():
        raise ConfigError(MODEL_FIELD, f"{path} has no config.json (not a Hugging Face model folder)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        causal = bool(set(config.architectures or []) & _causal_lm_classes())
        loader = AutoModelForCausalLM if causal else AutoModel
        model = loader.from_pretrained(path, local_files_only=True).float().eval()  # float32 on CPU
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # a corrupt weights file too
        raise ConfigError(MODEL_FIELD, f"cannot load {path}: {one_line(e)}") from None
    return _load_tokenizer(path), model


def _load_tokenizer(path: Path) -> Any:
    """The folder's tokenizer, padding on the right with a pad token it can mask."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(MODEL_FIELD, f"{path} has no usable tokenizer: {one_line(e)}") from None
    if tok.pad_token is None:  # e.g. Llama tokenizers: pad with <unk> (or </s>) and mask it
        tok.pad_token = tok.unk_token or tok.eos_token
        if tok.pad_token is None:
            raise ConfigError(MODEL_FIELD, f"the tokenizer in {path} has no pad, unk or eos token")
    tok.padding_side = "right"
    return tok


__all__ = [
    "ASSETS_ENV",
    "BUILTIN_SENTENCES",
    "DEFAULT_MODEL_PACKAGE",
    "default_model_dir",
    "find_assets",
    "load_model",
    "load_sentences",
]

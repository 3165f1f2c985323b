"""paradapt: parallel adapters on frozen Hugging Face models, many at once.

>>> import paradapt as pa
>>> pa.add_adapter(model, "sst2", pa.ParallelConfig(r=64, scale=4.0))
>>> with pa.route(model, ["sst2", None]):   # row 0 with the adapter, row 1 the base model
...     out = model(input_ids)

The configs and errors are plain Python and load with the package; the functions that touch
models (``add_adapter``, ``route``, ``save_adapter``, ...) load torch on first use, so
``import paradapt.serve`` (the scheduler, cache and workload that the digital twin reuses)
stays cheap and torch-free.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .config import (
    AdapterConfig,
    IA3Config,
    LoRAConfig,
    MAMConfig,
    Mixture,
    ParallelConfig,
    PrefixConfig,
    SeriesConfig,
    SSFConfig,
)
from .errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterNotFoundError,
    ConfigError,
    IncompatibleAdapterError,
    MergeError,
    ParadaptError,
    QuantizationError,
    RoutingError,
    TargetNotFoundError,
)

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time these load on first use
    from .fusing import fuse, unfuse
    from .io import load_adapter, save_adapter, save_peft_adapter
    from .lifecycle import (
        ParameterCount,
        active,
        add_adapter,
        add_mixture,
        fold,
        list_adapters,
        merge,
        parallel,
        remove_adapter,
        route,
        set_active,
        set_trainable,
        split_parallel,
        trainable_parameters,
        unmerge,
        unwrap,
    )
    from .mixture import mixture_aux_loss
    from .quantized import dequantize, quantization, quantize
    from .quantized_io import load_quantized, save_quantized
    from .routing import Average, Parallel, Stack

__version__ = "0.1.0"

# name -> the submodule that defines it (each of these imports torch)
_LAZY = {
    **dict.fromkeys(
        (
            "ParameterCount",
            "active",
            "add_adapter",
            "add_mixture",
            "fold",
            "list_adapters",
            "merge",
            "parallel",
            "remove_adapter",
            "route",
            "set_active",
            "set_trainable",
            "split_parallel",
            "trainable_parameters",
            "unmerge",
            "unwrap",
        ),
        "lifecycle",
    ),
    "fuse": "fusing",
    "unfuse": "fusing",
    "load_adapter": "io",
    "save_adapter": "io",
    "save_peft_adapter": "io",
    "Stack": "routing",
    "Parallel": "routing",
    "Average": "routing",
    "mixture_aux_loss": "mixture",
    "quantize": "quantized",
    "dequantize": "quantized",
    "quantization": "quantized",
    "save_quantized": "quantized_io",
    "load_quantized": "quantized_io",
}


def __getattr__(name: str) -> Any:
    """Load a model-side name (or a submodule, e.g. ``pa.io``) on first use and cache it here."""
    mod = _LAZY.get(name)
    if mod is not None:
        value = getattr(importlib.import_module(f".{mod}", __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AdapterConfig",
    "ParallelConfig",
    "SeriesConfig",
    "LoRAConfig",
    "IA3Config",
    "SSFConfig",
    "PrefixConfig",
    "MAMConfig",
    "Mixture",
    "add_adapter",
    "add_mixture",
    "mixture_aux_loss",
    "set_active",
    "active",
    "route",
    "merge",
    "unmerge",
    "fuse",
    "unfuse",
    "fold",
    "save_adapter",
    "load_adapter",
    "save_peft_adapter",
    "trainable_parameters",
    "ParameterCount",
    "remove_adapter",
    "unwrap",
    "list_adapters",
    "set_trainable",
    "parallel",
    "split_parallel",
    "quantize",
    "dequantize",
    "quantization",
    "save_quantized",
    "load_quantized",
    "Stack",
    "Parallel",
    "Average",
    "ParadaptError",
    "ConfigError",
    "TargetNotFoundError",
    "AdapterExistsError",
    "AdapterNotFoundError",
    "IncompatibleAdapterError",
    "AdapterFileError",
    "MergeError",
    "RoutingError",
    "QuantizationError",
]

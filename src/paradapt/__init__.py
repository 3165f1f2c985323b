"""paradapt: parallel adapters on frozen Hugging Face models, many at once.

>>> import paradapt as pa
>>> pa.add_adapter(model, "sst2", pa.ParallelConfig(r=64, scale=4.0))
>>> with pa.route(model, ["sst2", None]):   # row 0 with the adapter, row 1 the base model
...     out = model(input_ids)
"""

from .api import (
    ParameterCount,
    active,
    add_adapter,
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
from .config import (
    AdapterConfig,
    IA3Config,
    LoRAConfig,
    MAMConfig,
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
    RoutingError,
    TargetNotFoundError,
)
from .fuse import fuse, unfuse
from .io import load_adapter, save_adapter, save_peft_adapter
from .routing import Average, Parallel, Stack

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "ParallelConfig",
    "SeriesConfig",
    "LoRAConfig",
    "IA3Config",
    "SSFConfig",
    "PrefixConfig",
    "MAMConfig",
    "add_adapter",
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
]

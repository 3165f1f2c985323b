"""The Engine: Scheduler + AdapterCache + Runner, stepping continuous batches of adapter requests.

>>> engine = Engine(model, adapter_root="adapters/", config=EngineConfig(max_slots=4))
>>> h = engine.add_request([5, 17, 9], adapter="sst2", params=SamplingParams(max_new_tokens=8))
>>> engine.run()            # or engine.step() in your own loop, or engine.stream(h.id)
>>> h.tokens, h.finish_reason

Adapters are folders under ``adapter_root`` named by the adapter (``<root>/<name>/``, saved by
``pa.save_adapter``); a name that is not a plain folder name under the root is refused. The
cache's three tiers are real here: **disk** (the folder), **host** (the adapter's state dict
and config kept in CPU memory), **device** (attached to the model, its bottlenecks in banks).
A folder that fails to load fails only the requests for that adapter; the engine keeps serving.

A learned mixture (``paradapt train`` writes one next to its experts) is served by its folder
name like any adapter; its config names its experts, folders beside it under the root. The cache
brings the experts with it (``AdapterCache`` ``needs``), the gates run inside the packed step,
and requests of the mixture, of its experts and of other adapters share steps.

:class:`EncoderEngine` serves encoders (BERT, MiniLM): classify/embed requests run as one
padded batch per step with per-row routes, scheduled whole (no chunking, one "token" each).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import heads
from ..config import Mixture
from ..errors import (
    AdapterFileError,
    AdapterNotFoundError,
    ConfigError,
    ParadaptError,
)
from ..io import CONFIG_FILE, PEFT_WEIGHTS_FILE, WEIGHTS_FILE, build_folder, parse_folder, read_config
from ..lifecycle import MAX_NAME, add_adapter, attach_built, check_name, remove_adapter, route
from ..state import get_state, require_state
from .cache import AdapterPinnedError, Move
from .core import (
    AdapterAccessError,
    AdapterLoadError,
    EngineConfig,
    ServeCore,
    memory_split,
    scheduler_config,
)
from .detokenize import IncrementalDetokenizer
from .runner import Runner
from .sampling import SamplingParams
from .scheduler import Request, ScheduledStep, SchedulerConfig

log = logging.getLogger(__name__)


# -- adapters: disk (folders under a root) -> host (state dicts in CPU memory) -> device (on the model) --


@dataclass
class _HostCopy:
    """An adapter in host memory: the module built and checked when its folder was read
    (``built``), attached as is when it goes on the device; for PiSSA, whose attach changes the
    base from the adapter's initial factors, only its weights (``state``), loaded into a fresh
    build on attach."""

    config: object
    built: tuple[nn.Module, list] | None = None
    state: dict[str, torch.Tensor] | None = None
    parsed: object = None  # a mixture's folder: built on attach, once its experts are on the model


class AdapterStore:
    """The real engine's cache loader: adapter folders under ``root``, moved between tiers."""

    def __init__(self, model: nn.Module, root: str | Path | None, *, packed: bool = False):
        self.model = model
        self.packed = packed  # steps run packed routes (one token per row): no per-sequence gates
        self.root = None if root is None else Path(root).resolve()
        if self.root is not None and not self.root.is_dir():
            raise ConfigError("adapter_root", f"{root} is not a folder")
        self.host: dict[str, _HostCopy] = {}
        self.pending: dict[str, Future] = {}  # prefetched folders being read on the reader thread
        self._reader: ThreadPoolExecutor | None = None
        self.seconds: dict[str, float] = {}  # per move op: total wall time spent (metrics)
        self.aliases: dict[str, str] = {}  # served name -> folder name under the root (vLLM's lora_name)
        self.stamps: dict[str, tuple] = {}  # the folder's fingerprint when it was last read
        self.failed: dict[str, tuple] = {}  # folders that failed to load, at that fingerprint

    def alias(self, name: str, path: str | Path) -> None:
        """Serve the folder ``path`` (inside the root: relative to it, or absolute) as ``name``
        (vLLM's ``load_lora_adapter``, whose ``lora_name`` may differ from the folder's).

        Raises :class:`AdapterAccessError` for a path outside the root, and
        :class:`~paradapt.errors.AdapterNotFoundError` when no such folder exists; neither
        message shows the path (clients learn nothing of the server's disk).
        """
        try:
            check_name(name)
        except ConfigError as e:
            raise ConfigError("adapter", str(e)) from None
        if self.root is None:
            raise AdapterNotFoundError(f"unknown adapter {name!r} (the engine has no adapter_root)")
        given = Path(path)
        target = (given if given.is_absolute() else self.root / given).resolve()
        if target.parent != self.root:
            raise AdapterAccessError(
                f"the path of adapter {name!r} is not a folder directly inside the adapter root"
            )
        if not target.is_dir():
            raise AdapterNotFoundError(f"adapter {name!r}: no such folder in the adapter root")
        own = self.root / name
        if name != target.name and own.exists():
            raise ConfigError("adapter", f"{name!r} is already the name of another adapter folder")
        if self.aliases.get(name, target.name) != target.name:
            raise ConfigError("adapter", f"{name!r} is already loaded from another folder; unload it first")
        if name != target.name:
            self.aliases[name] = target.name

    def folder(self, name: str) -> Path:
        """The folder of adapter ``name``; names that are not plain folder names under the root are refused."""
        try:
            check_name(name)
        except ConfigError as e:
            raise ConfigError(
                "adapter",
                f"not an adapter name (letters, digits, '_' and '-', at most {MAX_NAME}; no paths): "
                + e.message,
            ) from None
        if self.root is None:
            raise AdapterNotFoundError(f"unknown adapter {name!r} (the engine has no adapter_root)")
        path = (self.root / self.aliases.get(name, name)).resolve()
        if path.parent != self.root:  # a symlink out of the root
            raise ConfigError("adapter", f"adapter {name!r} resolves outside the adapter root {self.root}")
        if not path.is_dir():
            raise AdapterNotFoundError(f"unknown adapter {name!r}: no folder {path}")
        self._check_links(path)
        return path

    def _check_links(self, folder: Path) -> None:
        """Refuse an adapter file that is a link resolving outside the adapter root: whoever may
        write one adapter folder must not make the server read (and serve) any file it can read."""
        for f in (CONFIG_FILE, WEIGHTS_FILE, PEFT_WEIGHTS_FILE):
            p = folder / f
            if p.is_symlink() and not p.resolve().is_relative_to(self.root):
                error = AdapterFileError(p, "is a link to a file outside the adapter root; refused")
                raise AdapterLoadError(folder.name, error)

    def names(self) -> list[str]:
        """The folder names under the root, sorted (none without a root); reads only the disk."""
        if self.root is None:
            return []
        aliases = self.aliases.copy()  # one C-level copy: the engine thread may add or drop aliases meanwhile
        return sorted({p.name for p in self.root.iterdir() if p.is_dir()} | set(aliases))

    def listable(self, name: str) -> bool:
        """Whether ``/v1/models`` lists folder ``name``: a valid name, a config that is a JSON
        object, a weights file inside the root, and no failed load since the folder last
        changed. (Cheap checks only: the weights are read when the adapter is first used.)"""
        try:
            folder = self.folder(name)
            config = read_config(folder)
        except (ParadaptError, OSError):
            return False
        weights = PEFT_WEIGHTS_FILE if "peft_type" in config else WEIGHTS_FILE
        if not (folder / weights).is_file():
            return False
        return name not in self.failed or self.failed[name] != self.fingerprint(name)

    def fingerprint(self, name: str) -> tuple:
        """What changes when the folder's files are rewritten (a save replaces the whole folder);
        an alias (vLLM's ``lora_name``) is fingerprinted by the folder it serves."""
        folder = self.root / self.aliases.get(name, name)
        out = []
        for f in (CONFIG_FILE, WEIGHTS_FILE, PEFT_WEIGHTS_FILE):
            try:
                st = (folder / f).stat()
            except OSError:
                continue
            out.append((f, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def contents(self, name: str) -> tuple:
        """The folder contents ``name`` runs with: the read copy's, when it is in host memory,
        else what a read gets now (the folder's current fingerprint)."""
        return self.stamps.get(name, ()) if name in self.host else self.fingerprint(name)

    def changed(self, name: str) -> bool:
        """Whether the folder of ``name`` was rewritten since it was last read (False if never read)."""
        return name in self.stamps and self.stamps[name] != self.fingerprint(name)

    def mark_failed(self, name: str) -> None:
        """Remember that the folder of ``name`` failed to load as it is now (``listable``)."""
        if self.root is not None and (self.root / self.aliases.get(name, name)).is_dir():
            self.failed[name] = self.fingerprint(name)

    def needs(self, name: str) -> tuple[str, ...]:
        """The experts a mixture folder names (empty for a plain adapter). A config that does not
        read gives none: loading the folder then says what is wrong with it."""
        try:
            cfg = read_config(self.folder(name)).get("config")
        except (ParadaptError, OSError):
            return ()
        if not isinstance(cfg, dict) or cfg.get("kind") != "mixture":
            return ()
        experts = cfg.get("experts")
        if not isinstance(experts, list) or not all(isinstance(e, str) for e in experts):
            return ()
        return tuple(experts)

    def size(self, name: str) -> int:
        """Bytes of the adapter's weights file (0 if missing: loading will say why)."""
        folder = self.folder(name)
        for f in (WEIGHTS_FILE, PEFT_WEIGHTS_FILE):
            if (folder / f).is_file():
                return (folder / f).stat().st_size
        return 0

    def largest(self) -> int:
        """Bytes of the largest adapter weights file under the root (0 without a root): the slot size."""
        if self.root is None:
            return 0
        sizes = [
            (d / f).stat().st_size
            for d in self.root.iterdir()
            if d.is_dir()
            for f in (WEIGHTS_FILE, PEFT_WEIGHTS_FILE)
            if (d / f).is_file()
        ]
        return max(sizes, default=0)

    def __call__(self, move: Move) -> None:
        """Carry out one cache decision on real weights."""
        name = move.adapter
        t0 = time.perf_counter()
        try:
            if move.op == "load_host" and move.ahead:
                self._read_ahead(name)
            elif move.op == "load_host":
                self.host[name] = self._read(name)
            elif move.op == "load_device":
                self._attach(name)
            elif move.op == "evict_device":
                remove_adapter(self.model, name)
                copy = self.host.get(name)
                if copy is not None and copy.built is not None:
                    copy.built[0].to("cpu")  # back to host memory (a no-op on a CPU model)
            else:
                self.forget(name)
        except Exception as e:  # a broken folder must never take the engine down
            if move.op.startswith("load") and not isinstance(e, AdapterLoadError):
                raise AdapterLoadError(name, e) from None
            raise
        finally:
            self.seconds[move.op] = self.seconds.get(move.op, 0.0) + time.perf_counter() - t0

    def forget(self, name: str) -> None:
        """Drop ``name`` from host memory, and its read-ahead if one is still queued."""
        self.host.pop(name, None)
        fut = self.pending.pop(name, None)
        if fut is not None:
            fut.cancel()

    def _read(self, name: str) -> _HostCopy:
        """Validate the folder against the model (without attaching it), keep its weights on the CPU."""
        return self._check(parse_folder(self._config_folder(name), name))

    def _config_folder(self, name: str) -> Path:
        folder = self.folder(name)
        if not (folder / CONFIG_FILE).is_file():
            raise AdapterFileError(folder / CONFIG_FILE, "missing")
        self.stamps[name] = self.fingerprint(name)
        self.failed.pop(name, None)
        return folder

    def _check(self, parsed) -> _HostCopy:
        if isinstance(parsed.config, Mixture):
            return self._check_mixture(parsed)
        adapter, parts = build_folder(self.model, parsed)
        adapter.to("cpu")
        if getattr(parsed.config, "init", None) == "pissa":  # its attach needs a fresh build
            return _HostCopy(parsed.config, state={k: v.detach() for k, v in adapter.state_dict().items()})
        return _HostCopy(parsed.config, built=(adapter, parts))

    def _check_mixture(self, parsed) -> _HostCopy:
        """A mixture's gates are built against its experts on the model, so its folder is kept
        parsed and built when it goes on the device (right after its experts)."""
        if self.packed and parsed.config.granularity == "sequence":
            raise ConfigError(
                "granularity",
                f"mixture {parsed.name!r} gates per sequence, which a decoder's packed steps cannot pool "
                "(a decode step sees one token of a row); train it with granularity: token",
            )
        return _HostCopy(parsed.config, parsed=parsed)

    def _read_ahead(self, name: str) -> None:
        """Start reading a prefetched folder on the reader thread (file I/O only: the model is
        not touched there); it is checked against the model when first needed (``settle``)."""
        folder = self._config_folder(name)
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="paradapt-reader")
        self.pending[name] = self._reader.submit(parse_folder, folder, name)

    def settle(self, name: str) -> None:
        """Finish a read-ahead of ``name``: wait for its file read, check it against the model.

        Raises :class:`AdapterLoadError` for a folder that does not load (the cache still
        lists it on host: the caller fails the adapter, as for a failed move).
        """
        fut = self.pending.pop(name, None)
        if fut is None:
            return
        try:
            self.host[name] = self._check(fut.result())
        except Exception as e:
            raise AdapterLoadError(name, e) from None

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _attach(self, name: str) -> None:
        self.settle(name)
        copy = self.host.get(name)
        if copy is None:
            raise AdapterLoadError(name, ParadaptError("not in host memory"))
        if copy.built is not None or copy.parsed is not None:  # attach as built (a mixture: now)
            adapter, parts = copy.built or build_folder(self.model, copy.parsed)
            adapter.to(self._device())
            attach_built(self.model, name, copy.config, adapter, parts)
            return
        add_adapter(self.model, name, copy.config, trainable=False)
        try:
            module = require_state(self.model).container[name]
            module.load_state_dict(copy.state)
            module.train(self.model.training)
        except Exception as e:
            remove_adapter(self.model, name)
            raise ParadaptError(f"weights do not fit: {e}") from None


def _args_naming(e: ConfigError | AdapterNotFoundError, where: str) -> tuple:
    """The constructor arguments of ``e`` (same type, same field) with ``where`` in front of its message."""
    if isinstance(e, ConfigError):
        return (e.field, f"{where}: {e.message}")
    return (f"{where}: {e}",)


def kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes of K and V of one token in every layer at the model's dtype (the paged cache's cost per token)."""
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * heads * head_dim * itemsize


# -- requests ------------------------------------------------------------------------------


@dataclass(eq=False)
class RequestHandle:
    """What the caller holds for one request: its tokens so far and how it ended.

    ``status``: waiting, running, finished, cancelled or failed (``error`` says why).
    ``finish_reason``: length, eos, stop, cancelled or error.
    """

    id: str
    adapter: str | None
    prompt: list[int]
    params: SamplingParams
    on_token: Callable[[RequestHandle, int], None] | None = None
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    # what each generated token added to ``text`` (serve.detokenize; EOS adds nothing and has none)
    text_pieces: list[str] = field(default_factory=list)
    detokenizer: IncrementalDetokenizer | None = field(default=None, repr=False)
    status: str = "waiting"
    finish_reason: str | None = None
    error: Exception | None = None
    result: dict | None = None  # encoder requests: {"label", "logits", "probs"} or {"embedding"}
    logprobs: list = field(default_factory=list)  # TokenLogprob per token, when params.logprobs is set
    prompt_logprobs: list = field(default_factory=list)  # per prompt token (None first), if asked
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (OpenAI's usage.prompt_tokens_details)
    task: str = "generate"
    arrival: float | None = None  # engine clock: queued, first token sampled, ended (TTFT, TPOT)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.status in ("finished", "cancelled", "failed")


class _EngineCore(ServeCore):
    """What both engines share: the planning core (:class:`ServeCore`) plus the model, the
    adapter store, the request handles, and the admin operations a server runs between steps
    (``load_adapter``, ``unload_adapter``, ``discard``; ``fail_*`` and the queue counts come from
    :class:`ServeCore`)."""

    def __init__(
        self,
        model: nn.Module,
        store: AdapterStore,
        config: EngineConfig,
        sched: SchedulerConfig,
        clock: Callable[[], float],
        device_bytes: int | None = None,
    ):
        st = get_state(model)
        if st is not None and st.adapters:
            raise ConfigError(
                "model", f"the engine manages the model's adapters; remove {sorted(st.adapters)} first"
            )
        self.model = model
        self.store = store
        super().__init__(config, sched, clock, loader=store, device_bytes=device_bytes)
        self.handles: dict[str, RequestHandle] = {}
        self._ids = itertools.count()
        self._kv_epoch = 0  # the served adapters' version (bumped when one is reloaded, unloaded or dropped)

    # -- adapters (the admin operations a server runs between steps) -----------------------
    def register_adapter(self, adapter: str | None) -> None:
        """Make an adapter known to the cache (its folder is checked now, read on first use)."""
        if adapter is None or adapter in self.cache:
            return
        experts = self.store.needs(adapter)
        for i, expert in enumerate(experts):
            try:
                if self.store.needs(expert):
                    raise ConfigError("experts", f"{expert!r} is a mixture; a mixture of mixtures is not served")
                if expert not in self.cache:
                    self.cache.add_adapter(expert, self.store.size(expert))
            except (ConfigError, AdapterNotFoundError) as e:
                raise type(e)(*_args_naming(e, f"mixture {adapter!r}, experts[{i}]")) from None
        self.cache.add_adapter(adapter, self.store.size(adapter), needs=experts)

    def load_adapter(self, name: str) -> None:
        """Register ``name`` and read it into host memory now, so a broken folder fails here
        (:class:`AdapterLoadError`) and not in a later request (POST /v1/adapters).

        A known adapter whose folder was rewritten since it was read is reloaded: forgotten on
        every tier, then read again. Refused (:class:`AdapterPinnedError`, 409) while requests
        use it: they keep the weights they started with.
        """
        if name in self.cache and self.store.changed(name):
            users = self.adapter_users(name)
            if users:
                raise AdapterPinnedError(
                    f"adapter {name!r} changed on disk but {users} running or queued request(s) use it; "
                    "load it again when they have finished (or save the new version under another name)"
                )
            self.cache.remove_adapter(name)
            self._kv_epoch += 1
            self.store.forget(name)
            self.store.stamps.pop(name, None)
        self.register_adapter(name)
        moves = self.cache.prefetch([name])
        if name not in self.cache.on_host and not moves:
            raise AdapterLoadError(name, ParadaptError("no host room to load it now (it loads on demand)"))
        try:
            self.store.settle(name)  # the prefetch reads in the background: check it now
        except AdapterLoadError as e:
            self.fail_adapter(name, e)
            raise

    def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name``; refused (:class:`AdapterPinnedError`) while running *or
        queued* requests name it.

        The cache alone refuses only pinned (running) adapters; a queued request for a forgotten
        adapter would make every later scheduler step fail on the unknown name.
        """
        users = self.adapter_users(name)
        if users:
            raise AdapterPinnedError(f"adapter {name!r} is in use by {users} running or queued request(s)")
        self.cache.remove_adapter(name)
        self._kv_epoch += 1
        self.store.aliases.pop(name, None)

    def served_adapters(self) -> list[str]:
        """Adapters held in host memory (device residents included), least recently used first."""
        return self.cache.on_host

    # -- requests -------------------------------------------------------------------
    def _queue(self, handle: RequestHandle, prompt_len: int, max_new_tokens: int) -> RequestHandle:
        self.register_adapter(handle.adapter)
        handle.arrival = self.clock()
        self.scheduler.add(Request(handle.id, handle.adapter, prompt_len, max_new_tokens, handle.arrival))
        self.handles[handle.id] = handle
        return handle

    def _new_id(self, request_id: str | None) -> str:
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.handles and not self.handles[rid].done:
            raise ConfigError("id", f"request id {rid!r} is already in use")
        return rid

    def cancel(self, request_id: str) -> bool:
        """Cancel a waiting or running request; its KV pages and adapter slot free at once."""
        if not self.scheduler.cancel(request_id, now=self.clock()):
            return False
        self._forget(request_id)
        h = self.handles[request_id]
        h.status, h.finish_reason = "cancelled", "cancelled"
        return True

    def pop(self, request_id: str) -> RequestHandle:
        """Hand back a finished request's handle and stop tracking it (servers call this)."""
        h = self.handles.get(request_id)
        if h is None:
            raise ConfigError("id", f"unknown request id {request_id!r}")
        if not h.done:
            raise ConfigError("id", f"request {request_id!r} is still {h.status}; cancel it first")
        return self.handles.pop(request_id)

    def discard(self, request_id: str) -> None:
        """Stop tracking a request a server no longer watches: cancel it if unfinished, then
        forget its handle (the engine keeps a handle until it is popped or discarded)."""
        h = self.handles.get(request_id)
        if h is None:
            return
        if not h.done:
            self.cancel(request_id)
        if h.done:
            self.handles.pop(request_id, None)

    # -- failures (the ServeCore hooks) ---------------------------------------------------
    def _mark_failed(self, request_id: str, error: Exception) -> RequestHandle:
        h = self.handles[request_id]
        h.status, h.finish_reason, h.error = "failed", "error", error
        return h

    def _drop_adapter(self, adapter: str) -> None:
        self._kv_epoch += 1
        self.store.forget(adapter)
        self.store.mark_failed(adapter)
        st = get_state(self.model)
        if st is not None and adapter in st.adapters:
            remove_adapter(self.model, adapter)

    def run(self, max_steps: int | None = None) -> dict[str, RequestHandle]:
        """Step until every request is done (or ``max_steps``); returns all handles."""
        for _ in itertools.count() if max_steps is None else range(max_steps):
            if not self.has_work():
                break
            self.step()
        return self.handles

    def step(self) -> list[RequestHandle]:  # pragma: no cover - overridden
        raise NotImplementedError


class Engine(_EngineCore):
    """Continuous batching for decoder LMs: packed paged-attention steps under per-token routes."""

    def __init__(
        self,
        model: nn.Module,
        adapter_root: str | Path | None = None,
        config: EngineConfig | None = None,
        *,
        tokenizer=None,
        clock: Callable[[], float] = time.monotonic,
    ):
        config = config or EngineConfig()
        store = AdapterStore(model, adapter_root, packed=True)
        largest = store.largest() if config.device_memory is not None and config.slot_bytes is None else 0
        split = memory_split(config, kv_bytes_per_token(model), largest)
        self.runner = Runner(
            model,
            page_size=config.page_size,
            num_blocks=split.num_blocks,
            max_batch_tokens=config.token_budget,
            decode_attention=config.decode_attention,
            check_adapter_weights=config.check_adapter_weights,
            lm_head_gemm=config.lm_head_gemm,
            layer_gemm=config.layer_gemm,
            max_rows=config.max_running,
        )
        sched = scheduler_config(config, split.num_blocks)
        if (sched.kv_tokens, sched.kv_block) != (self.runner.kv_tokens, self.runner.kv_block):
            raise ParadaptError(
                f"the Runner holds {self.runner.kv_tokens} KV tokens in blocks of {self.runner.kv_block}, "
                f"the scheduler expected {sched.kv_tokens} in blocks of {sched.kv_block}"
            )
        super().__init__(model, store, config, sched, clock, split.device_bytes)
        self.scheduler.on_admit = self._admitted
        self.prefix_stats = {"queries": 0, "hits": 0}  # prompt tokens looked up / found in the prefix cache
        self.tokenizer = tokenizer
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.default_eos: frozenset[int] = (
            frozenset() if eos is None else frozenset([eos] if isinstance(eos, int) else eos)
        )

    @property
    def decode_attention(self) -> str:
        """How decode steps read the KV pages: ``kernel`` (the C++ kernel), ``compiled`` (torch.compile,
        in place) or ``gather`` (copy + SDPA)."""
        return self.runner.decode_attention.used

    @property
    def lm_head_gemm(self) -> str:
        """How the LM head multiplies: ``linear`` (``F.linear``), ``packed from N rows`` (a weight
        prepacked for oneDNN), ``int8 up to N rows`` (a GGUF Q8_0 head's own int8 form), or both
        (:mod:`paradapt.serve.lm_head`)."""
        return self.runner.head_product.used

    @property
    def layer_gemm(self) -> str:
        """How the other linear layers multiply: ``linear`` (``F.linear``), ``kernel up to N rows``
        (the few-rows C++ kernel), ``packed from N rows`` (weights prepacked for oneDNN), or both
        (:mod:`paradapt.serve.layer_gemm`)."""
        return self.runner.layer_product.used

    def add_request(
        self,
        prompt: list[int] | str,
        adapter: str | None = None,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        on_token: Callable[[RequestHandle, int], None] | None = None,
    ) -> RequestHandle:
        """Queue a generation; ``prompt`` is token ids (or text, with a tokenizer). Returns its handle."""
        params = params or SamplingParams()
        ids = self._encode(prompt)
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop", "stop strings need the engine's tokenizer")
        check_token_ids(self.model, ids, "prompt")
        limit = max_positions(self.model)
        if limit is not None and len(ids) + params.max_new_tokens > limit:
            raise ConfigError(
                "max_tokens",
                f"{len(ids)} prompt + {params.max_new_tokens} new tokens exceed the model's {limit} positions",
            )
        h = RequestHandle(self._new_id(request_id), adapter, ids, params, on_token)
        if self.tokenizer is not None:
            h.detokenizer = IncrementalDetokenizer(self.tokenizer, ids)
            h.text_pieces = h.detokenizer.pieces
        return self._queue(h, len(ids), params.max_new_tokens)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("prompt", "text prompts need the engine's tokenizer; pass token ids")
            prompt = self.tokenizer(prompt)["input_ids"]
        ids = [int(t) for t in prompt]
        if not ids:
            raise ConfigError("prompt", "must have at least one token")
        return ids

    def _forget(self, request_id: str) -> None:
        self.runner.free(request_id)

    def _admitted(self, r: Request) -> int:
        """Start an admitted request in the runner (the scheduler's ``on_admit``); returns the
        prompt tokens its prefix-cache hit covers, where its prefill starts."""
        h = self.handles[r.id]
        salt = self._salt(h.adapter, h.params.cache_salt)
        seq = self.runner.add(r.id, h.prompt, h.adapter, h.params, self._eos_of(h), salt=salt)
        h.logprobs, h.prompt_logprobs = seq.logprobs, seq.prompt_logprobs  # the runner fills them
        h.status, h.cached_tokens = "running", seq.cached
        self.prefix_stats["queries"] += len(h.prompt) if seq.salt is not None else 0
        self.prefix_stats["hits"] += seq.cached
        return seq.cached

    def _salt(self, adapter: str | None, cache_salt: str | None = None) -> str | None:
        """The prefix cache's key for ``adapter``'s KV: its name, the contents of its folder (and
        of its experts', for a mixture) that this request runs with, and :attr:`_kv_epoch`
        (bumped whenever a served adapter is reloaded, unloaded or dropped). So pages computed
        with other weights are never shared: a folder rewritten on disk while the adapter was
        evicted is read again with a new fingerprint. A request's ``cache_salt`` (vLLM's) comes
        last: pages are shared only between requests with the same one. None when prefix
        caching is off."""
        if not self.config.prefix_caching or self.config.check_adapter_weights:
            return None
        tenant = "" if cache_salt is None else f"|salt:{cache_salt}"  # adapter names hold no "|"
        if adapter is None:
            return "base" + tenant
        weights = [self.store.contents(a) for a in (*self.cache.needs(adapter), adapter)]
        return f"{self._kv_epoch}:{adapter}:{weights}{tenant}"

    def step(self) -> list[RequestHandle]:
        """One scheduler step: schedule, load adapters, one packed forward, sample; returns the
        handles that ended in it (finished or failed)."""
        step, now = self._schedule()  # each admitted request starts in the runner (_admitted)
        shape = self._traced_shape(step)
        try:
            return self._execute(step, now)
        finally:
            self._end_trace(shape)

    def _execute(self, step: ScheduledStep, now: float) -> list[RequestHandle]:
        """The model's part of a step: forward, sample, record; returns finished handles."""
        if step.empty:
            return []
        marks, failed = self._marks(step), []
        try:
            new = self.runner.execute(step)
        except Exception as e:  # find the request at fault; the others run on (see _isolate)
            new, failed = self._isolate(step, marks, e)
        for error in self.runner.take_nonfinite():  # rows not sampled: only their requests fail
            if not self.handles[error.request_id].done:  # once (a rerun may report it again)
                log.error("request %s failed: %s", error.request_id, error)
                failed.extend(self.fail_requests([error.request_id], error))
        stopped = {rid for rid, tok in new.items() if self._emit(self.handles[rid], tok)}
        done, end = failed, self.clock()
        for r in self.scheduler.complete(step, now, stopped):
            self.runner.free(r.id)
            h = self.handles[r.id]
            h.status, h.finished_at = "finished", end
            h.finish_reason = h.finish_reason or "length"
            done.append(h)
        return done

    def _marks(self, step: ScheduledStep) -> dict[str, tuple[int, torch.Tensor | None]]:
        """Where each request of ``step`` stands before it runs: its KV position and its random
        stream's state, so that a failed step can be run again from there (:meth:`_isolate`)."""
        out = {}
        for rid in _step_ids(step):
            seq = self.runner.get(rid)
            if seq is not None and seq.kv is not None:
                g = seq.generator
                out[rid] = (seq.kv.position_offset, None if g is None else g.get_state())
        return out

    def _rewind(self, rid: str, mark: tuple[int, torch.Tensor | None] | None) -> None:
        seq = self.runner.get(rid)
        if seq is None or mark is None:
            return
        seq.kv.position_offset = mark[0]
        if mark[1] is not None:
            seq.generator.set_state(mark[1])

    def _isolate(
        self, step: ScheduledStep, marks: dict, error: Exception
    ) -> tuple[dict[str, int], list[RequestHandle]]:
        """A step raised: run each of its requests alone from where it stood, fail only those
        that raise again (each with its own error), and return the others' tokens.

        One request's data (a prompt, an adapter, sampling parameters) must fail only that
        request. Running alone gives the same tokens as in the packed step (a row's values never
        depend on its batch-mates), and rewinding the KV position and the random stream makes
        the rerun the step that failed. KV pages written by the failed attempt are overwritten
        with the same values. Returns the tokens of the requests that ran, and the failed handles.
        """
        ids = _step_ids(step)
        log.warning("step of %d requests failed (%s); running them one by one", len(ids), error)
        new: dict[str, int] = {}
        failed: dict[str, Exception] = {}
        for rid in ids:
            self._rewind(rid, marks.get(rid))
            try:
                if len(ids) == 1:
                    raise error
                new.update(self.runner.execute(self._keep(step, rid.__eq__)))  # rid's part alone
            except Exception as e:
                log.error("request %s failed in a step: %s", rid, e, exc_info=e)
                failed[rid] = e
        handles = [h for rid, e in failed.items() for h in self.fail_requests([rid], e)]
        return new, handles

    def _emit(self, h: RequestHandle, token: int) -> bool:
        """Record a sampled token; True if it ends the request (EOS or a stop string)."""
        eos = self._eos_of(h)
        if not h.tokens:
            h.first_token_at = self.clock()
        h.tokens.append(token)
        ended = token in eos
        d = h.detokenizer
        if d is not None:  # the EOS token's own text ("</s>") is not part of the answer
            if not ended:
                d.push(token)
            if ended or len(h.tokens) >= h.params.max_new_tokens:
                d.flush()  # the request ends here: release a held incomplete character
            h.text = d.text
        if h.on_token is not None:
            h.on_token(h, token)
        if ended:
            h.finish_reason = "eos"
            return True
        if h.text is not None and h.params.stop:  # cut at the earliest stop string in the text
            hits = [i for s in h.params.stop if (i := h.text.find(s)) >= 0]
            if hits:
                h.text = h.text[: min(hits)]
                h.finish_reason = "stop"
                return True
        return False

    def _eos_of(self, h: RequestHandle) -> frozenset[int]:
        """The ids that end ``h``: its own, none with ignore_eos, else the model's."""
        return (
            h.params.eos_ids()
            if h.params.eos_token_id is not None or h.params.ignore_eos
            else self.default_eos
        )

    def stream(self, request_id: str) -> Iterator[int]:
        """Yield ``request_id``'s tokens as they are sampled, stepping the engine (all requests advance)."""
        h = self.handles[request_id]
        sent = 0
        while True:
            while sent < len(h.tokens):
                sent += 1
                yield h.tokens[sent - 1]
            if h.done:
                return
            self.step()


class EncoderEngine(_EngineCore):
    """Classify/embed requests for encoders: one padded batch of whole prompts per step, per-row routes.

    ``classify`` needs an adapter with a head (``paradapt.heads``); ``embed`` mean-pools the last
    hidden states (of the base model when ``adapter`` is None).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter_root: str | Path | None = None,
        config: EngineConfig | None = None,
        *,
        pad_token_id: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ):
        config = config or EngineConfig()
        sched = SchedulerConfig(
            token_budget=config.token_budget,
            kv_tokens=config.token_budget * config.max_running * 2,
            chunked_prefill=False,
            max_running=min(config.max_running, config.token_budget),
            queue_bound=config.queue_bound,
            starvation_after=config.starvation_after,
        )
        super().__init__(model, AdapterStore(model, adapter_root), config, sched, clock)
        self.pad_token_id = pad_token_id

    def add_request(
        self,
        tokens: list[int],
        adapter: str | None = None,
        *,
        task: str = "classify",
        request_id: str | None = None,
    ) -> RequestHandle:
        if task not in ("classify", "embed"):
            raise ConfigError("task", f"must be 'classify' or 'embed', got {task!r}")
        if task == "classify" and adapter is None:
            raise ConfigError("adapter", "classify needs an adapter with a classification head")
        ids = [int(t) for t in tokens]
        if not ids:
            raise ConfigError("tokens", "must have at least one token")
        check_token_ids(self.model, ids, "tokens")
        limit = max_positions(self.model)
        if limit is not None and len(ids) > limit:
            raise ConfigError("tokens", f"{len(ids)} tokens exceed the model's {limit} positions")
        h = RequestHandle(self._new_id(request_id), adapter, ids, SamplingParams(max_new_tokens=1), task=task)
        return self._queue(h, len(ids), 1)

    def step(self) -> list[RequestHandle]:
        step, now = self._schedule()
        if step.empty:
            return []
        rows = [self.handles[c.request_id] for c in step.prefills]
        results = self._forward(rows)
        for h, res in zip(rows, results, strict=True):
            if isinstance(res, Exception):
                h.error, res = res, None
            h.result = res
        done = []
        for r in self.scheduler.complete(step, now):
            h = self.handles[r.id]
            h.status = "failed" if h.error is not None else "finished"
            h.finish_reason = "error" if h.error is not None else "length"
            done.append(h)
        return done

    def _forward(self, rows: list[RequestHandle]) -> list:
        width = max(len(h.prompt) for h in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, h in enumerate(rows):
            ids[i, : len(h.prompt)] = torch.tensor(h.prompt)
            mask[i, : len(h.prompt)] = 1
        routes = [h.adapter for h in rows]
        with torch.no_grad():
            if get_state(self.model) is None:
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            else:
                with route(self.model, routes):
                    hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        out: list = [None] * len(rows)
        ok = []
        for i, h in enumerate(rows):
            if h.task == "classify":
                try:
                    heads.head_of(self.model, h.adapter)
                    ok.append(i)
                except ParadaptError as e:  # this adapter has no head: only its requests fail
                    out[i] = e
        if ok:
            idx = torch.tensor(ok)
            names = [rows[i].adapter for i in ok]
            logits = heads.classify(self.model, hidden[idx], mask[idx], names)
            for j, i in enumerate(ok):
                labels = heads.head_of(self.model, names[j]).labels
                row = logits[j, : len(labels)]
                out[i] = {
                    "label": labels[int(row.argmax())],
                    "logits": row.tolist(),
                    "probs": row.softmax(-1).tolist(),
                }
        emb = heads.pool(hidden, mask, "mean")
        for i, h in enumerate(rows):
            if h.task == "embed":
                out[i] = {"embedding": emb[i].tolist()}
        return out


def _step_ids(step: ScheduledStep) -> list[str]:
    return [*(c.request_id for c in step.prefills), *step.decodes]


def check_token_ids(model: nn.Module, ids: list[int], field: str) -> None:
    """Token ids outside the vocabulary would fail the whole step inside the embedding: refuse them here."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        span = f"0..{vocab - 1}" if vocab is not None else ">= 0"
        raise ConfigError(field, f"token id {bad[0]} is outside the vocabulary ({span})")


def max_positions(model: nn.Module) -> int | None:
    """The model's position limit (None when it has none, e.g. rotary models without a set maximum)."""
    v = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return v if isinstance(v, int) and v > 0 else None

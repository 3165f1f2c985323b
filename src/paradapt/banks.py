"""Banks: the bottlenecks of many adapters at one site, stacked for mixed-batch inference.

A bank holds every loaded adapter of one *signature* at a site (what it reads,
its activation, whether it has biases, dtype and device) stacked along a slot
axis: ``wd: [slots, d_in, r]``, ``wu: [slots, r, d_out]``, ``bd: [slots, r]``,
``bu: [slots, d_out]``, ``scale: [slots]``. Mixed ranks share one bank: ``r`` is
the largest rank inserted, rounded up to a multiple of 8 (so grouped GEMMs always
apply), and a smaller adapter's extra columns of ``wd``/``bd`` and rows of ``wu``
are zero. The zero rows of ``wu`` make the padded units add exactly nothing
whatever the activation, and the extra FLOPs are tiny next to the base model;
what it saves is one matmul pair (and its dispatch) per rank present per site.

A bank is an inference copy of the adapters' parameters, which stay the
source of truth (training, saving and merging use them). Each slot remembers
the version and storage of the parameters it was copied from; a slot whose
parameters changed (an optimizer step, ``load_state_dict``, ``.to()``) is
recopied before use, so a bank is never stale. Slots are reused after removal
and capacity doubles when full, so inserting costs the same at the 1000th
adapter as at the first.

Rows are assigned to slots by a :class:`Layout` (slot order) and sorted into
:class:`Segments` once per forward and layout; every site and layer whose
bank has the same layout shares them (see ``routing.Plan.segments``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from . import kernels
from .bottleneck import _ACTS, Bottleneck


class Layout:
    """An immutable slot order (slot -> adapter name); banks with equal orders share one object."""

    __slots__ = ("names", "index", "__weakref__")

    def __init__(self, names: tuple[str | None, ...]):
        self.names = names
        self.index = {n: i for i, n in enumerate(names) if n is not None}


_layouts: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def layout_of(names: tuple[str | None, ...]) -> Layout:
    """The shared Layout for this slot order (interned, so segments are computed once per order)."""
    lay = _layouts.get(names)
    if lay is None:
        lay = _layouts[names] = Layout(names)
    return lay


@dataclass
class Segments:
    """Rows of a batch sorted by slot for one layout: computed once per forward, used by every site."""

    perm: torch.Tensor | None  # the rows in slot order (None: rows 0..n-1 already are)
    row_slot: torch.Tensor  # slot of each sorted row, [n]
    slots: list[int]  # slots present, ascending
    counts: list[int]  # rows per present slot
    present: torch.Tensor  # slots present, as a tensor
    _offs: dict = field(default_factory=dict)

    def offsets(self, tokens: int, capacity: int | None) -> torch.Tensor:
        """End offset in flattened tokens of each segment, int32 as grouped GEMMs take them: of the
        present slots only (``capacity=None``), or of all ``capacity`` slots, absent ones empty."""
        key = (tokens, capacity)
        got = self._offs.get(key)
        if got is None:
            if capacity is None:
                per_slot = [c * tokens for c in self.counts]
            else:
                per_slot = [0] * capacity
                for s, c in zip(self.slots, self.counts, strict=True):
                    per_slot[s] = c * tokens
            got = self._offs[key] = torch.tensor(per_slot, device=self.present.device).cumsum(0).int()
        return got

    @classmethod
    def build(
        cls, runs: list[tuple[str | None, int, int]], batch: int, layout: Layout, device: torch.device
    ) -> Segments | None:
        """Sort the rows whose adapter has a slot in ``layout``; ``None`` if there are none.

        ``runs`` are ``(adapter, first row, row count)`` of consecutive rows with one adapter (a
        packed request's tokens, a row's beams), so the work is per run, not per row.
        """
        index = layout.index
        keyed = sorted((index[n], start, count) for n, start, count in runs if n is not None and n in index)
        if not keyed:
            return None
        rows: list[int] = []
        slots, counts = [], []
        for s, start, count in keyed:
            rows.extend(range(start, start + count))
            if slots and slots[-1] == s:
                counts[-1] += count
            else:
                slots.append(s)
                counts.append(count)
        identity = len(rows) == batch and all(keyed[i][1] < keyed[i + 1][1] for i in range(len(keyed) - 1))
        slot_t = torch.tensor(slots, device=device)
        return cls(
            perm=None if identity else torch.tensor(rows, device=device),
            row_slot=slot_t.repeat_interleave(torch.tensor(counts, device=device)),
            slots=slots,
            counts=counts,
            present=slot_t,
        )


def bankable(comp) -> bool:
    """Bottlenecks that add to a site's output (parallel, series, LoRA) go in banks."""
    return isinstance(comp, Bottleneck) and comp.writes == "output"


RANK_ALIGN = 8  # bank ranks round up to this: 16-byte rows for grouped GEMMs in fp32 and bf16


def signature(comp: Bottleneck, device: torch.device) -> tuple:
    """What adapters must share to sit in one bank (not the rank: ranks are padded)."""
    w = comp.down.weight
    return (
        comp.reads,
        comp.act_name,
        comp.d_in,
        comp.d_out,
        comp.down.bias is not None,
        comp.up.bias is not None,
        w.dtype,
        device,
    )


def _aligned(r: int) -> int:
    return -(-r // RANK_ALIGN) * RANK_ALIGN


def _sources(comp: Bottleneck) -> list[tuple[dict, str]]:
    """Where each tensor a slot copies lives (module dict, key): a replaced tensor shows up there."""
    out = []
    for mod, key in ((comp.down, "weight"), (comp.up, "weight"), (comp.down, "bias"), (comp.up, "bias")):
        if mod._parameters.get(key) is not None:
            out.append((mod._parameters, key))
    out.append((comp._parameters if "scale" in comp._parameters else comp._buffers, "scale"))
    return out


class _Stamp:
    """The tensors a slot was copied from, with their storage and version, checked in O(tensors)."""

    __slots__ = ("entries",)

    def __init__(self, comp: Bottleneck):
        self.entries = [(d, k, d[k], d[k].data_ptr(), d[k]._version) for d, k in _sources(comp)]

    def current(self) -> bool:
        """Still the same tensors, storage and version (no in-place change, no replacement)?"""
        for d, k, t, ptr, ver in self.entries:
            if d.get(k) is not t or t._version != ver or t.data_ptr() != ptr:
                return False
        return True


class Bank:
    """The stacked weights of one signature's adapters at one site."""

    def __init__(self, comp: Bottleneck, device: torch.device, capacity: int = 4):
        self.sig = signature(comp, device)
        self.reads = comp.reads
        self.act = _ACTS[comp.act_name]
        self.r, self.d_in, self.d_out = _aligned(comp.r), comp.d_in, comp.d_out
        self.dtype, self.device = comp.down.weight.dtype, device
        self.has_bd, self.has_bu = comp.down.bias is not None, comp.up.bias is not None
        self.names: list[str | None] = []
        self.stamps: list[_Stamp | None] = []
        self.free: list[int] = []
        self.layout = layout_of(())
        self._alloc(capacity, self.r)

    def _alloc(self, cap: int, r: int) -> None:
        """(Re)allocate for ``cap`` slots of rank ``r``, keeping the slots written so far (zero-padded)."""

        def new(*shape):
            return torch.zeros(cap, *shape, dtype=self.dtype, device=self.device)

        old = getattr(self, "wd", None)
        tensors = {
            "wd": new(self.d_in, r),
            "wu": new(r, self.d_out),
            "scale": new(),
            "bd": new(r) if self.has_bd else None,
            "bu": new(self.d_out) if self.has_bu else None,
        }
        if old is not None:
            n, r0 = old.shape[0], self.r
            for k, t in tensors.items():
                if t is None:
                    continue
                src = getattr(self, k)
                if k == "wd":
                    t[:n, :, :r0] = src
                elif k == "wu":
                    t[:n, :r0] = src
                elif k == "bd":
                    t[:n, :r0] = src
                else:
                    t[:n] = src
        self.r = r
        for k, t in tensors.items():
            setattr(self, k, t)

    @property
    def capacity(self) -> int:
        return self.wd.shape[0]

    def __contains__(self, name: str) -> bool:
        return name in self.layout.index

    @torch.no_grad()
    def _write(self, slot: int, comp: Bottleneck) -> None:
        """Copy ``comp`` into ``slot``: its rank's units, zeros in the padded rest."""
        if comp.r > self.r:
            self._alloc(self.capacity, _aligned(comp.r))
        r = comp.r

        def put(dst, src):
            dst.copy_(src.detach().to(self.device, self.dtype))

        for t in (self.wd, self.wu, self.bd):
            if t is not None:
                t[slot].zero_()
        put(self.wd[slot, :, :r], comp.down.weight.t())
        put(self.wu[slot, :r], comp.up.weight.t())
        put(self.scale[slot], comp.scale)
        if self.has_bd:
            put(self.bd[slot, :r], comp.down.bias)
        if self.has_bu:
            put(self.bu[slot], comp.up.bias)
        self.stamps[slot] = _Stamp(comp)

    def insert(self, name: str, comp: Bottleneck) -> None:
        if self.free:
            slot = self.free.pop()
            self.names[slot] = name
        else:
            slot = len(self.names)
            if slot == self.capacity:
                self._alloc(2 * self.capacity, self.r)
            self.names.append(name)
            self.stamps.append(None)
        self._write(slot, comp)
        self.layout = layout_of(tuple(self.names))

    def remove(self, name: str) -> None:
        slot = self.layout.index.get(name)
        if slot is None:
            return
        self.names[slot], self.stamps[slot] = None, None
        self.free.append(slot)
        self.layout = layout_of(tuple(self.names))

    def fits(self, comp: Bottleneck) -> bool:
        return signature(comp, self.device) == self.sig

    def fresh(self, name: str, comp: Bottleneck) -> bool:
        """Whether the slot still holds exactly the component's current parameters."""
        stamp = self.stamps[self.layout.index[name]]
        return stamp is not None and stamp.current()

    def refresh(self, name: str, comp: Bottleneck) -> None:
        """Recopy a slot whose parameters changed since it was written."""
        self._write(self.layout.index[name], comp)

    # -- math ------------------------------------------------------------------------
    def delta(self, src: torch.Tensor, seg: Segments) -> torch.Tensor:
        """``s * act(src Wd + bd) Wu + bu`` for rows sorted by slot; src: [n, T, d_in]."""
        x = src.to(self.dtype)
        scale = self.scale.index_select(0, seg.row_slot)[:, None, None]
        bd = self.bd.index_select(0, seg.row_slot)[:, None, :] if self.has_bd else None

        def post(a: torch.Tensor) -> torch.Tensor:
            if bd is not None:
                a = a + bd
            return self.act(a) * scale

        n, t, k = x.shape[0], x.shape[1], len(seg.slots)
        key = kernels.shape_key(x.device, self.dtype, n, t, k, (self.d_in, self.r, self.d_out))
        candidates = {
            "segments": lambda: kernels.segments(x, self.wd, self.wu, seg.slots, seg.counts, post),
            "gather": lambda: kernels.gather(x, self.wd, self.wu, seg.row_slot, post),
        }
        if kernels.grouped_ok(x, self.r, self.d_out):
            # CUDA's grouped GEMM skips empty groups, so the whole bank is used as is; the CPU one
            # loops over every group, so there the present slots are gathered first.
            whole = x.device.type == "cuda" or k == self.capacity
            present = None if whole else seg.present
            offs = seg.offsets(t, self.capacity if whole else None)
            candidates["grouped"] = lambda: kernels.grouped(x, self.wd, self.wu, present, offs, post)
        out = kernels.run(key, x.device, candidates)
        if self.has_bu:
            out = out + self.bu.index_select(0, seg.row_slot)[:, None, :]
        return out

"""Banks: the bottlenecks of many adapters at one site, stacked for mixed-batch inference.

A bank holds every loaded adapter of one *signature* at a site (what it reads,
its activation, its rank, whether it has biases, dtype and device) stacked
along a slot axis: ``wd: [slots, d_in, r]``, ``wu: [slots, r, d_out]``,
``bd: [slots, r]``, ``bu: [slots, d_out]``, ``scale: [slots]``. Adapters of
other ranks live in their own bank at the same site, so mixed ranks cost one
matmul pair per rank present in the batch and nothing is padded.

A bank is an inference copy of the adapters' parameters, which stay the
source of truth (training, saving and merging use them). Each slot remembers
the version and storage of the parameters it was copied from; a slot whose
parameters changed (an optimizer step, ``load_state_dict``, ``.to()``) is
recopied before use, so a bank is never stale. Slots are reused after removal
and capacity doubles when full, so inserting costs the same at the 1000th
adapter as at the first.

Rows are assigned to slots by a :class:`Layout` (slot order) and sorted into
:class:`Segments` once per forward and layout; every site and layer whose
bank has the same layout shares them (see ``routing.RouteMap.segments``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from . import kernels, native
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
    # every row's slot in batch order, -1 for rows of no slot here (the fused kernel reads rows
    # as they come); None where rows are not a batch's (a mixture's (token, expert) pairs)
    slot_of_row: torch.Tensor | None = None
    _offs: dict = field(default_factory=dict)

    def offsets(self, tokens: int) -> torch.Tensor:
        """End offset of each segment in flattened tokens (int32, as grouped GEMMs take them)."""
        got = self._offs.get(tokens)
        if got is None:
            got = self._offs[tokens] = self.present.new_tensor(self.counts).cumsum(0).mul_(tokens).int()
        return got

    @classmethod
    def build(cls, row_names: list[str | None], layout: Layout, device: torch.device) -> Segments | None:
        """Sort the rows whose adapter has a slot in ``layout``; ``None`` if there are none."""
        pairs = sorted(
            (layout.index[n], i) for i, n in enumerate(row_names) if n is not None and n in layout.index
        )
        if not pairs:
            return None
        rows = [i for _, i in pairs]
        slot_of_row = [s for s, _ in pairs]
        slots, counts = [], []
        for s in slot_of_row:
            if slots and slots[-1] == s:
                counts[-1] += 1
            else:
                slots.append(s)
                counts.append(1)
        identity = rows == list(range(len(row_names)))
        every = [-1] * len(row_names)
        for s, i in pairs:
            every[i] = s
        return cls(
            perm=None if identity else torch.tensor(rows, device=device),
            row_slot=torch.tensor(slot_of_row, device=device),
            slots=slots,
            counts=counts,
            present=torch.tensor(slots, device=device),
            slot_of_row=torch.tensor(every, device=device),
        )

    @classmethod
    def of_slots(cls, slot_of_row: torch.Tensor) -> Segments:
        """Rows given by their slots in any order (a mixture's (token, expert) pairs), sorted by
        slot with tensor ops: ``perm`` (always set) is the order that sorts them, stable."""
        row_slot, perm = torch.sort(slot_of_row, stable=True)
        present, counts = torch.unique_consecutive(row_slot, return_counts=True)
        return cls(
            perm=perm, row_slot=row_slot, slots=present.tolist(), counts=counts.tolist(), present=present
        )


#: Activations the fused kernel (``csrc/bgmv.cpp``'s ``lora_add``) applies itself: LoRA's and the
#: bottleneck adapters' usual ReLU.
FUSED_ACTS = ("identity", "relu")


def bankable(comp) -> bool:
    """Bottlenecks that add to a site's output (parallel, series, LoRA) go in banks."""
    return isinstance(comp, Bottleneck) and comp.writes == "output"


def signature(comp: Bottleneck, device: torch.device) -> tuple:
    w = comp.down.weight
    return (
        comp.reads,
        comp.act_name,
        comp.r,
        comp.down.bias is not None,
        comp.up.bias is not None,
        w.dtype,
        device,
    )


def _sources(comp: Bottleneck) -> list[tuple[dict, str]]:
    """Where each tensor a slot copies lives (module dict, key): a replaced tensor shows up there."""
    out = []
    for mod, key in ((comp.down, "weight"), (comp.up, "weight"), (comp.down, "bias"), (comp.up, "bias")):
        if mod._parameters.get(key) is not None:
            out.append((mod._parameters, key))
    out.append((comp._parameters if "scale" in comp._parameters else comp._buffers, "scale"))
    return out


class _Stamp:
    """The tensors a slot was copied from, with their storage and version, checked in O(tensors).

    ``trainable``: whether any of them required a gradient when copied (an adapter being trained,
    whose optimizer edits it in place): such a slot is checked even under ``fixed_weights``."""

    __slots__ = ("entries", "trainable")

    def __init__(self, comp: Bottleneck):
        self.entries = [(d, k, d[k], d[k].data_ptr(), d[k]._version) for d, k in _sources(comp)]
        self.trainable = any(t.requires_grad for _, _, t, _, _ in self.entries)

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
        self.act_name = comp.act_name
        self.r, self.d_in, self.d_out = comp.r, comp.d_in, comp.d_out
        self.dtype, self.device = comp.down.weight.dtype, device
        self.has_bd, self.has_bu = comp.down.bias is not None, comp.up.bias is not None
        self.names: list[str | None] = []
        self.stamps: list[_Stamp | None] = []
        self.free: list[int] = []
        self.layout = layout_of(())
        self._alloc(capacity)

    def _alloc(self, cap: int) -> None:
        def new(*shape):
            return torch.zeros(cap, *shape, dtype=self.dtype, device=self.device)

        old = getattr(self, "wd", None)
        tensors = {
            "wd": new(self.d_in, self.r),
            "wu": new(self.r, self.d_out),
            "scale": new(),
            "bd": new(self.r) if self.has_bd else None,
            "bu": new(self.d_out) if self.has_bu else None,
        }
        if old is not None:
            n = old.shape[0]
            for k, t in tensors.items():
                if t is not None:
                    t[:n] = getattr(self, k)
        for k, t in tensors.items():
            setattr(self, k, t)

    @property
    def capacity(self) -> int:
        return self.wd.shape[0]

    def __contains__(self, name: str) -> bool:
        return name in self.layout.index

    @torch.no_grad()
    def _write(self, slot: int, comp: Bottleneck) -> None:
        def put(dst, src):
            dst[slot].copy_(src.detach().to(self.device, self.dtype))

        put(self.wd, comp.down.weight.t())
        put(self.wu, comp.up.weight.t())
        put(self.scale, comp.scale)
        if self.has_bd:
            put(self.bd, comp.down.bias)
        if self.has_bu:
            put(self.bu, comp.up.bias)
        self.stamps[slot] = _Stamp(comp)

    def insert(self, name: str, comp: Bottleneck) -> None:
        if self.free:
            slot = self.free.pop()
            self.names[slot] = name
        else:
            slot = len(self.names)
            if slot == self.capacity:
                self._alloc(2 * self.capacity)
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

    def trusted(self, name: str) -> bool:
        """Whether the slot may be reused unchecked under ``fixed_weights``: it was copied from
        tensors none of which required a gradient (frozen, e.g. read from a file)."""
        stamp = self.stamps[self.layout.index[name]]
        return stamp is not None and not stamp.trainable

    def refresh(self, name: str, comp: Bottleneck) -> None:
        """Recopy a slot whose parameters changed since it was written."""
        self._write(self.layout.index[name], comp)

    # -- math ------------------------------------------------------------------------
    def _strategies(self, x: torch.Tensor) -> tuple[str, ...]:
        """The strategies that may run on ``x`` (kernels.py), in the order they are measured."""
        names = ("segments", "gather")
        if kernels.native_ready(x.device):
            names += ("kernel",)
        if kernels.grouped_ok(x, self.r, self.d_out):
            names += ("grouped",)
        return names

    def _key(self, device: torch.device, rows: int, tokens: int, seg: Segments) -> tuple:
        """The shape class of ``seg``'s ``rows`` of ``tokens`` tokens, for :func:`kernels.run`."""
        dims = (self.d_in, self.r, self.d_out)
        return kernels.shape_key(device, self.dtype, rows, tokens, len(seg.slots), dims)

    def add_fused(self, h: torch.Tensor, src: torch.Tensor, seg: Segments) -> torch.Tensor | None:
        """``h`` plus this bank's delta for every row of a batch in one C++ call, when ``kernel`` is
        the strategy chosen for the shape (it reads each row's slot in place, so the rows need no
        sorting and the deltas no scatter back, and the bias, activation and scale between the two
        products are no separate tensor ops); None where it does not apply (another strategy, an
        activation it does not have, dtypes that differ, a shape not measured yet).

        ``h``: [batch, ..., d_out] of the bank's dtype; ``src``: the rows the bank reads, [batch, ..., d_in].
        Rounds as :meth:`delta` then ``h + delta`` do, so the results are the same to the bit.
        """
        if self.act_name not in FUSED_ACTS or seg.slot_of_row is None or h.dtype != self.dtype:
            return None
        x = src.reshape(src.shape[0], -1, src.shape[-1])
        key = self._key(h.device, len(seg.row_slot), x.shape[1], seg)
        if h.device.type != "cpu" or kernels.chosen(key, h.device) != "kernel":
            return None
        out = native.BGMV.load().lora_add(
            h.reshape(x.shape[0], x.shape[1], -1),
            x.to(self.dtype),
            self.wd,
            self.wu,
            seg.slot_of_row,
            self.scale,
            self.bd if self.has_bd else None,
            self.bu if self.has_bu else None,
            self.act_name == "relu",
        )
        return out.view(h.shape)

    def delta(self, src: torch.Tensor, seg: Segments) -> torch.Tensor:
        """``s * act(src Wd + bd) Wu + bu`` for rows sorted by slot; src: [n, T, d_in]."""
        x = src.to(self.dtype)
        scale = self.scale.index_select(0, seg.row_slot)[:, None, None]
        bd = self.bd.index_select(0, seg.row_slot)[:, None, :] if self.has_bd else None

        def post(a: torch.Tensor) -> torch.Tensor:
            if bd is not None:
                a = a + bd
            return self.act(a) * scale

        key = self._key(x.device, x.shape[0], x.shape[1], seg)

        def make(name: str):
            if name == "kernel":
                return lambda: kernels.kernel(x, self.wd, self.wu, seg.row_slot, post)
            if name == "gather":
                return lambda: kernels.gather(x, self.wd, self.wu, seg.row_slot, post)
            if name == "grouped":  # every slot present: no compaction needed
                present = None if len(seg.slots) == self.capacity else seg.present
                return lambda: kernels.grouped(x, self.wd, self.wu, present, seg.offsets(x.shape[1]), post)
            return lambda: kernels.segments(x, self.wd, self.wu, seg.slots, seg.counts, post)

        out = kernels.run(key, x.device, lambda: self._strategies(x), make)
        if self.has_bu:
            out = out + self.bu.index_select(0, seg.row_slot)[:, None, :]
        return out

"""Mixed ranks share one bank per site: smaller adapters are zero-padded to the bank's rank.

Padding must be exact (zero rows of ``W_u`` add nothing whatever the activation), survive the bank
growing its rank after slots were written, and leave one bank per site kind.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_banks import mixed, per_row_reference

import paradapt as pa
from paradapt import kernels
from paradapt.banks import RANK_ALIGN
from paradapt.state import get_state


@pytest.mark.parametrize("strategy", [*kernels.STRATEGIES, None])
def test_mixed_ranks_in_one_bank_equal_each_row_alone(strategy):
    model = tiny_model("llama")
    ranks = {"l2": 2, "l5": 5, "l8": 8}
    for name, r in ranks.items():
        pa.add_adapter(model, name, pa.LoRAConfig(r=r, init="random"))
    pa.add_adapter(model, "p3", pa.ParallelConfig(r=3, init="random", act="gelu"))
    pa.add_adapter(model, "p16", pa.ParallelConfig(r=16, init="random", act="gelu"))
    ids = torch.randint(0, 96, (6, 5), generator=torch.Generator().manual_seed(3))
    rows = ["l2", "p3", "l8", None, "l5", "p16"]
    torch.testing.assert_close(
        mixed(model, ids, rows, strategy), per_row_reference(model, ids, rows), atol=1e-5, rtol=1e-5
    )
    for site in get_state(model).sites.values():
        assert len(site.banks) <= 1  # every rank of a kind in one bank
    # a larger rank arrives after the bank was filled: it grows, the earlier slots stay exact
    pa.add_adapter(model, "l40", pa.LoRAConfig(r=40, init="random"))
    rows = ["l40", "l2", "l8", "p16", "l5", "l40"]
    torch.testing.assert_close(
        mixed(model, ids, rows, strategy), per_row_reference(model, ids, rows), atol=1e-5, rtol=1e-5
    )
    lora_banks = [b for s in get_state(model).sites.values() for b in s.banks.values() if "l40" in b]
    assert lora_banks and all(b.r == 40 + (-40) % RANK_ALIGN for b in lora_banks)


def test_a_reused_slot_of_a_smaller_adapter_is_zeroed():
    """A slot freed by a large adapter and refilled by a small one must not keep the old tail."""
    model = tiny_model("llama")
    pa.add_adapter(model, "big", pa.LoRAConfig(r=16, init="random"))
    pa.add_adapter(model, "other", pa.LoRAConfig(r=4, init="random"))
    ids = torch.randint(0, 96, (2, 4), generator=torch.Generator().manual_seed(4))
    mixed(model, ids, ["big", "other"])
    pa.remove_adapter(model, "big")
    pa.add_adapter(model, "small", pa.LoRAConfig(r=4, init="random"))
    rows = ["small", "other"]
    torch.testing.assert_close(
        mixed(model, ids, rows), per_row_reference(model, ids, rows), atol=1e-5, rtol=1e-5
    )

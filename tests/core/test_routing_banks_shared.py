"""Mixed ranks at one site: one bank per rank present, nothing padded to the largest rank (issue 3).

Rows of every rank in one batch equal each row alone; a larger rank arriving later gets its own
bank and leaves the filled ones exact; a slot freed by one adapter and refilled by another of the
same rank keeps nothing of the old one.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_banks import mixed, per_row_reference

import paradapt as pa
from paradapt import kernels
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
        for bank in site.banks.values():  # each bank holds one rank: no adapter is padded
            assert all(site.components[n].r == bank.r for n in bank.names if n is not None)
    # a larger rank arrives after the bank was filled: it grows, the earlier slots stay exact
    pa.add_adapter(model, "l40", pa.LoRAConfig(r=40, init="random"))
    rows = ["l40", "l2", "l8", "p16", "l5", "l40"]
    torch.testing.assert_close(
        mixed(model, ids, rows, strategy), per_row_reference(model, ids, rows), atol=1e-5, rtol=1e-5
    )
    lora_banks = [b for s in get_state(model).sites.values() for b in s.banks.values() if "l40" in b]
    assert lora_banks and all(b.r == 40 and "l2" not in b for b in lora_banks)


def test_a_reused_slot_of_a_smaller_adapter_is_zeroed():
    """A slot freed by one adapter and refilled by another must not keep the old weights."""
    model = tiny_model("llama")
    pa.add_adapter(model, "big", pa.LoRAConfig(r=4, init="random"))
    pa.add_adapter(model, "other", pa.LoRAConfig(r=4, init="random"))
    ids = torch.randint(0, 96, (2, 4), generator=torch.Generator().manual_seed(4))
    mixed(model, ids, ["big", "other"])
    pa.remove_adapter(model, "big")
    pa.add_adapter(model, "small", pa.LoRAConfig(r=4, init="random"))
    rows = ["small", "other"]
    torch.testing.assert_close(
        mixed(model, ids, rows), per_row_reference(model, ids, rows), atol=1e-5, rtol=1e-5
    )

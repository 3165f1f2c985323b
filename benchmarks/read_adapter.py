"""Time to read one adapter folder into a checked, built module (what the server's cache does).

A read parses the folder (config + safetensors) and builds the adapter's modules for the model,
unattached, with the file's weights (``io.parse_folder`` + ``io.build_folder``). The build now
skips the random init of every weight the file overwrites; this times it side by side with the
same build *with* the init (``lifecycle.build_detached(..., initialise=True)`` + the weight copy: what
a read cost before), per adapter kind, interleaved over ``--reps`` rounds, on the serving
benchmarks' random Llama (``twin.profile.build_model``: hidden 512, 8 layers).

    python benchmarks/read_adapter.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import paradapt as pa  # noqa: E402
from paradapt import io  # noqa: E402
from paradapt.lifecycle import build_detached  # noqa: E402
from paradapt.twin.profile import build_model  # noqa: E402  (the serving benchmarks' random Llama)

KINDS = {
    "lora r=8 (q,v)": lambda: pa.LoRAConfig(r=8),
    "lora r=16 all-linear": lambda: pa.LoRAConfig(r=16, targets="all-linear"),
    "parallel r=64": lambda: pa.ParallelConfig(r=64),
    "series r=64": lambda: pa.SeriesConfig(r=64),
    "ia3": lambda: pa.IA3Config(),
    "prefix 16": lambda: pa.PrefixConfig(num_virtual_tokens=16),
}


def with_init(m, folder) -> None:
    """The read as it was: build with the random init, then copy the file's weights in."""
    adapter, _ = build_detached(m, folder.name, folder.config, initialise=True)
    io._copy_weights(adapter, folder.tensors)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    m = build_model(layers=8, hidden=512)
    root = tempfile.mkdtemp()
    for i, cfg in enumerate(KINDS.values()):
        pa.add_adapter(m, f"a{i}", cfg())
        pa.save_adapter(m, f"a{i}", f"{root}/a{i}")
        pa.remove_adapter(m, f"a{i}")
    pa.add_adapter(m, "resident", pa.LoRAConfig(r=4))  # reads go onto a model that already has adapters
    print(
        f"torch {torch.__version__}, {a.threads} thread(s), load {os.getloadavg()[0]:.2f}; ms per folder, median of {a.reps}"
    )
    print(
        f"{'kind':<22}{'parse':>8}{'build, init':>13}{'build, no init':>16}{'read before':>13}{'read now':>10}{'speed-up':>10}"
    )
    for i, kind in enumerate(KINDS):
        folder = io.parse_folder(f"{root}/a{i}", None)
        io.build_folder(m, folder)
        with_init(m, folder)  # warm-up
        t = {"parse": [], "init": [], "no init": []}
        for _ in range(a.reps):
            for key, fn in (
                ("parse", lambda: io.parse_folder(f"{root}/a{i}", None)),  # noqa: B023
                ("init", lambda: with_init(m, folder)),  # noqa: B023
                ("no init", lambda: io.build_folder(m, folder)),  # noqa: B023
            ):
                s = time.perf_counter()
                fn()
                t[key].append(1000 * (time.perf_counter() - s))
        med = {k: statistics.median(v) for k, v in t.items()}
        before, now = med["parse"] + med["init"], med["parse"] + med["no init"]
        print(
            f"{kind:<22}{med['parse']:>8.2f}{med['init']:>13.2f}{med['no init']:>16.2f}"
            f"{before:>13.2f}{now:>10.2f}{before / now:>9.2f}x"
        )


if __name__ == "__main__":
    main()

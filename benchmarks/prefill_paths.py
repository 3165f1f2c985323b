"""Two CPU fast paths, each against the code it replaced, side by side in one process:

* ``lm_loss``: a training step of a chat adapter on SmolLM2-135M-Instruct (16 rows x 100
  tokens, the last 4 of each learned, a parallel adapter r=32) with the LM head on the learned
  positions only (``paradapt.train.lm_loss``, the default) vs the loss the training loop used
  before (every position's logits, cross-entropy over all with the others ignored);
* ``burst``: the serving engine on a burst of 48 chat prompts (the three shipped adapters' first
  16 held-out rows each, ~92 tokens, 3 output tokens), whose first step of each 16 holds only
  new prompts: each request attending over its own keys (``hf_paged._attend_own``, the
  default) vs transformers' one SDPA over the packed row under a block-diagonal mask.

Interleaved A/B, ``--repeats`` rounds, one torch thread; prints each round's seconds and the
median ratio. Needs the named model ``smollm2-135m-instruct`` (converted once from its GGUF).

    python benchmarks/prefill_paths.py --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F


def lm_loss_case():
    """(new, old): one forward + backward of the same batch each way."""
    import paradapt as pa
    from paradapt.loading import load_model
    from paradapt.train import lm_loss
    from paradapt.train.data import IGNORE_INDEX

    _, model = load_model("smollm2-135m-instruct")
    pa.add_adapter(model, "a", pa.ParallelConfig(r=32, scale=4.0))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49000, (16, 100), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -4:] = ids[:, -4:]
    with pa.route(model, ["a"]):
        assert lm_loss.head_gathers(model, {"input_ids": ids[:1]})

    def new() -> None:
        model.zero_grad(set_to_none=True)
        with pa.route(model, ["a"] * 16):
            learned = lm_loss.learned_logits(model, {"input_ids": ids}, labels, gather=True)
        learned.row_losses().sum().backward()

    def old() -> None:  # the loop's loss before lm_loss: every position's logits, then the masked loss
        model.zero_grad(set_to_none=True)
        with pa.route(model, ["a"] * 16):
            logits = model(input_ids=ids).logits
        tok = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=IGNORE_INDEX
        )
        tok.sum().backward()

    return new, old


def burst_case():
    """(new, old): the engine serving the burst with and without the per-request first step."""
    import paradapt.serve.hf_paged as hf_paged
    from paradapt.bundled import bundled, bundled_root, held_out_records
    from paradapt.loading import load_model
    from paradapt.serve.engine import Engine, EngineConfig
    from paradapt.serve.sampling import SamplingParams

    model_name = "smollm2-135m-instruct"
    tok, model = load_model(model_name)
    engine = Engine(model, bundled_root(model_name), EngineConfig(max_running=16, token_budget=2048, max_slots=4))
    reqs = []
    for name in sorted(bundled(model_name)):
        for r in held_out_records(name, 16):
            ids = tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, return_dict=False)
            reqs.append((name, list(ids)))
    reqs = [reqs[i] for i in sorted(range(len(reqs)), key=lambda i: (i % 16, i))]  # the adapters interleaved
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    real = hf_paged._per_request

    def packed_first_steps(*a, **k):
        path = real(*a, **k)
        return None if path == "own" else path

    def serve(own: bool):
        def run() -> None:
            hf_paged._per_request = real if own else packed_first_steps
            try:
                for name, ids in reqs:
                    engine.add_request(ids, name, params)
                engine.run()
                for h in list(engine.handles.values()):
                    engine.pop(h.id)
            finally:
                hf_paged._per_request = real

        return run

    return serve(True), serve(False)


CASES = {"lm_loss": lm_loss_case, "burst": burst_case}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    for case in a.cases.split(","):
        new, old = CASES[case]()
        new(), old()  # warm up both
        ratios = []
        for i in range(a.repeats):
            times = {}
            for label, fn in (("new", new), ("old", old)) if i % 2 == 0 else (("old", old), ("new", new)):
                t = time.perf_counter()
                with torch.enable_grad() if case == "lm_loss" else contextlib.nullcontext():
                    fn()
                times[label] = time.perf_counter() - t
            ratios.append(times["old"] / times["new"])
            print(f"{case} round {i}: new {times['new']:.3f} s, old {times['old']:.3f} s, old/new {ratios[-1]:.2f}", flush=True)
        print(f"{case}: old/new median {statistics.median(ratios):.2f} over {a.repeats} rounds", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

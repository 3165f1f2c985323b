"""lm-evaluation-harness's ``local-completions`` model against a live server (issue 15).

lm-eval's three request types go through ``/v1/completions`` on the real stories260K model:
``loglikelihood`` (a multiple-choice task: echo + logprobs, batched token-id prompts),
``loglikelihood_rolling`` (a perplexity task) and ``generate_until`` (greedy, stopped at a
newline). Tasks are tiny JSONL files with YAML configs written in the test's tmp dir; each
answer lm-eval records equals the same computation on a plain forward of the model.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import asset_path, completion_text, require_asset
from test_serve_api import live_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from paradapt.serve.app import create_app
from paradapt.serve.engine import Engine, EngineConfig

STORIES = asset_path("models", "stories260k-hf")
CFG = EngineConfig(page_size=16, num_blocks=64, token_budget=64, max_running=8, max_slots=2, max_served=3)

MC = [
    {"question": "Lily went to the park. She saw a", "choices": ["dog", "car", "sky"], "answer": 0},
    {"question": "Tom was very happy because he had a new", "choices": ["toy", "the", "ran"], "answer": 0},
]
ROLLING = [{"text": "Once upon a time there was a little girl named Lily. She loved to play outside."}]
GEN = [{"prompt": "Once upon a time", "target": "x"}, {"prompt": "The little dog", "target": "y"}]


def _task(tmp, name: str, rows: list[dict], body: str) -> None:
    (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = (
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp / (name + '.jsonl')}\ntest_split: test\n"
    )
    (tmp / f"{name}.yaml").write_text(head + body)


def _tasks(tmp) -> None:
    _task(
        tmp,
        "pa_mc",
        MC,
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n",
    )
    _task(
        tmp,
        "pa_rolling",
        ROLLING,
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n",
    )
    _task(
        tmp,
        "pa_gen",
        GEN,
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n",
    )


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def _score(model, context: list[int], continuation: list[int]) -> float:
    ids = context + continuation
    lp = _logprobs(model, ids)
    return sum(float(lp[p - 1, ids[p]]) for p in range(len(context), len(ids)))


def test_lm_eval_local_completions_runs_all_three_request_types(tmp_path):
    import lm_eval  # a pinned test dependency: a missing install fails, not skips
    from lm_eval.tasks import TaskManager

    require_asset(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(STORIES)
    _tasks(tmp_path)
    app = create_app(Engine(model, None, CFG, tokenizer=tok), model_name="stories")
    with live_server(app) as port:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "model": "stories",
                "base_url": f"http://127.0.0.1:{port}/v1/completions",
                "tokenizer": str(STORIES),
                "tokenizer_backend": "huggingface",
                "tokenized_requests": True,
                "max_length": 512,
                "max_retries": 1,
                "batch_size": 4,  # lm-eval sends a list of token-id prompts per request
            },
            tasks=["pa_mc", "pa_rolling", "pa_gen"],
            task_manager=TaskManager(include_path=str(tmp_path)),
            log_samples=True,
            num_fewshot=0,
        )
    samples = out["samples"]
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731  (lm-eval's encoding)
    for doc, sample in zip(MC, samples["pa_mc"], strict=True):  # loglikelihood
        for choice, resp in zip(doc["choices"], sample["resps"], strict=True):
            whole, context = enc(doc["question"] + " " + choice), enc(doc["question"])
            ll, _ = resp[0]
            assert ll == pytest.approx(_score(model, context, whole[len(context) :]), abs=1e-3)
    (ll,) = samples["pa_rolling"][0]["resps"][0]  # loglikelihood_rolling: the text after BOS
    assert ll == pytest.approx(_score(model, [tok.bos_token_id], enc(ROLLING[0]["text"])), abs=1e-3)
    for doc, sample in zip(GEN, samples["pa_gen"], strict=True):  # generate_until
        ids = enc(doc["prompt"])
        gen = []
        for _ in range(12):
            gen.append(int(_logprobs(model, ids + gen)[-1].argmax()))
        want = completion_text(tok, ids, gen).split("\n")[0]
        assert sample["resps"][0][0] == want
    assert "acc,none" in out["results"]["pa_mc"] and "word_perplexity,none" in out["results"]["pa_rolling"]

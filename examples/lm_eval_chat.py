"""lm-evaluation-harness against ``paradapt serve``: SmolLM2 with and without a shipped chat adapter.

    paradapt serve &                                   # SmolLM2 + its three shipped chat adapters
    python examples/lm_eval_chat.py chat-sst2-parallel --limit 200

For the shipped adapter named on the command line, this writes an lm-eval task from the adapter's
held-out test rows (``paradapt.bundled.held_out_records``: the rows its card's accuracy was measured
on): a multiple-choice question whose context is the card's user message, rendered with
SmolLM2's own chat template (lm-eval's ``apply_chat_template``), and whose choices are the card's
answer words right after the assistant's turn starts. It then runs lm-eval's ``local-completions``
model (``loglikelihood`` requests through ``/v1/completions`` with ``echo`` and ``logprobs``) once
for the base model and once for the adapter, and prints both accuracies: lm-eval's ``acc`` is
the share of rows whose right answer word is the most likely one.

Needs ``pip install 'paradapt[eval]'`` (lm-eval) and a running server (``--url``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

MODEL = "smollm2-135m-instruct"


def write_task(folder: Path, adapter: str, limit: int | None) -> str:
    """An lm-eval task (YAML + JSONL) of the adapter's test rows; returns the task's name."""
    from paradapt.bundled import card, held_out_records

    labels = card(adapter)["labels"]
    rows = held_out_records(adapter, limit)
    data = folder / f"{adapter}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for r in rows:  # the user message (the card's prompt template, filled) and the answer's index
            f.write(
                json.dumps({"text": r["messages"][-2]["content"], "answer": labels.index(r["answer"])}) + "\n"
            )
    name = "paradapt_" + adapter.replace("-", "_")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{text}}"\n'
        f"doc_to_choice: {json.dumps(labels)}\n"
        "doc_to_target: answer\n"
        'target_delimiter: ""\n'  # the answer word comes right after the assistant's turn starts
        "metric_list:\n  - metric: acc\n",
        encoding="utf-8",
    )
    return name


def evaluate(url: str, served: str, task: str, folder: Path, batch_size: int) -> float:
    """lm-eval's ``acc`` for the model (or adapter) ``served`` on ``task``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from paradapt.models import resolve_model

    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": served,
            "base_url": f"{url}/v1/completions",
            "tokenizer": str(resolve_model(MODEL)),  # the converted folder: the server's own tokenizer
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "max_length": 2048,
            "batch_size": batch_size,
            "max_retries": 1,
        },
        tasks=[task],
        task_manager=TaskManager(include_path=str(folder)),
        apply_chat_template=True,
        num_fewshot=0,
    )
    return out["results"][task]["acc,none"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapter", help="a shipped SmolLM2 chat adapter, e.g. chat-sst2-parallel")
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the paradapt server")
    ap.add_argument("--limit", type=int, default=None, help="the first N test rows (default: all)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per lm-eval request")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        task = write_task(Path(tmp), args.adapter, args.limit)
        base = evaluate(args.url, MODEL, task, Path(tmp), args.batch_size)
        tuned = evaluate(args.url, args.adapter, task, Path(tmp), args.batch_size)
    print(f"lm-eval acc on {task}: base {MODEL} {base:.4f}, {args.adapter} {tuned:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which clients nobody here wrote work against ``paradapt serve``? A compatibility table.

Starts the real ``paradapt serve`` (a child process on a free loopback port) on stories260K
(the real Llama in the shared assets) with one random LoRA adapter under a temporary root and
a ``--chat-template`` (stories260K's tokenizer has none), then drives it with each client:
the official ``openai`` client, lm-evaluation-harness ``local-completions`` (its three request
types, on a tiny task written to a temp dir), LangChain's ``OpenAI`` and ``ChatOpenAI``, and
litellm. Prints one line per (client, call): ``works``, ``FAILS: <error>``, or ``not installed``.

    python benchmarks/client_compat.py            # needs PARADAPT_ASSETS (or a shared/assets above)

Clients are optional: ``pip install openai 'lm-eval[api]' langchain-openai litellm``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm: no network at import

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _stories() -> Path:
    from paradapt.loading import find_assets

    assets = find_assets()
    if assets is None:
        sys.exit("client_compat: set PARADAPT_ASSETS to the shared assets folder")
    return assets / "models" / "stories260k-hf"


def _setup(tmp: Path) -> tuple[Path, Path, Path]:
    """The model folder, an adapter root with one random LoRA ("lo"), a chat template file."""
    import torch
    from transformers import AutoModelForCausalLM

    import paradapt as pa

    model_dir = _stories()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(0)
    pa.add_adapter(model, "lo", pa.LoRAConfig(r=4, init="random"))
    pa.save_adapter(model, "lo", tmp / "adapters" / "lo")
    (tmp / "chat.jinja").write_text(TEMPLATE)
    return model_dir, tmp / "adapters", tmp / "chat.jinja"


def _openai(base: str) -> dict:
    import openai

    c = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    chat = [{"role": "user", "content": "Hi"}]
    return {
        "completions": lambda: (
            c.completions.create(model="lo", prompt="Once upon a time", max_tokens=8).choices[0].text
        ),
        "completions, 2 prompts x n=2": lambda: len(
            c.completions.create(model="lo", prompt=["Once", "Tom"], n=2, max_tokens=4).choices
        ),
        "completions echo+logprobs": lambda: (
            c.completions.create(model="lo", prompt="Once upon a time", max_tokens=0, echo=True, logprobs=1)
            .choices[0]
            .logprobs.token_logprobs[:3]
        ),
        "completions stream+usage": lambda: (
            [
                ch.usage
                for ch in c.completions.create(
                    model="lo",
                    prompt="Tom had",
                    max_tokens=4,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            ][-1].total_tokens
        ),
        "chat": lambda: (
            c.chat.completions.create(model="lo", messages=chat, max_tokens=8).choices[0].message.content
        ),
        "chat logprobs": lambda: (
            c.chat.completions.create(model="lo", messages=chat, max_tokens=4, logprobs=True, top_logprobs=2)
            .choices[0]
            .logprobs.content[0]
            .logprob
        ),
        "chat stream": lambda: "".join(
            ch.choices[0].delta.content or ""
            for ch in c.chat.completions.create(model="lo", messages=chat, max_tokens=8, stream=True)
            if ch.choices
        ),
        "models.retrieve": lambda: c.models.retrieve("lo").id,
        "tools (refused)": lambda: c.chat.completions.create(
            model="lo", messages=chat, tools=[{"type": "function", "function": {"name": "f"}}]
        ),
    }


def _lm_eval(base: str, model_dir: Path, tmp: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    rows = {
        "mc": (
            [{"q": "Lily saw a", "c": ["dog", "car"], "a": 0}],
            'output_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: "{{c}}"\ndoc_to_target: a\nmetric_list:\n  - metric: acc\n',
        ),
        "rolling": (
            [{"t": "Once upon a time there was a girl."}],
            'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{t}}"\nmetric_list:\n  - metric: word_perplexity\n',
        ),
        "gen": (
            [{"p": "Once upon a time", "t": "x"}],
            'output_type: generate_until\ndoc_to_text: "{{p}}"\ndoc_to_target: "{{t}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n',
        ),
    }
    for name, (data, body) in rows.items():
        (tmp / f"cc_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        head = f"task: cc_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp / f'cc_{name}.jsonl'}\ntest_split: test\n"
        (tmp / f"cc_{name}.yaml").write_text(head + body)
    args = {
        "model": "lo",
        "base_url": f"{base}/completions",
        "tokenizer": str(model_dir),
        "tokenizer_backend": "huggingface",
        "max_length": 512,
        "max_retries": 1,
    }

    def run(task: str):
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=args,
            tasks=[task],
            task_manager=TaskManager(include_path=str(tmp)),
        )
        return {k: round(v, 4) for k, v in out["results"][task].items() if isinstance(v, float)}

    return {
        "local-completions loglikelihood": lambda: run("cc_mc"),
        "local-completions loglikelihood_rolling": lambda: run("cc_rolling"),
        "local-completions generate_until": lambda: run("cc_gen"),
    }


def _langchain(base: str) -> dict:
    from langchain_openai import ChatOpenAI, OpenAI

    llm = OpenAI(model="lo", base_url=base, api_key="unused", max_tokens=8, temperature=0)
    chat = ChatOpenAI(model="lo", base_url=base, api_key="unused", max_tokens=8, temperature=0)
    return {
        "OpenAI.invoke": lambda: llm.invoke("Once upon a time"),
        "OpenAI.batch": lambda: llm.batch(["Once upon a time", "Tom had"]),
        "OpenAI.stream": lambda: "".join(llm.stream("Once upon a time")),
        "ChatOpenAI.invoke": lambda: chat.invoke("Hi").content,
        "ChatOpenAI.stream": lambda: "".join(c.content for c in chat.stream("Hi")),
        "ChatOpenAI logprobs": lambda: (
            chat.bind(logprobs=True).invoke("Hi").response_metadata["logprobs"]["content"][0]["logprob"]
        ),
    }


def _litellm(base: str) -> dict:
    import litellm

    msgs = [{"role": "user", "content": "Hi"}]
    kw = {"api_base": base, "api_key": "unused", "max_tokens": 8}
    return {
        "completion (chat)": lambda: (
            litellm.completion(model="openai/lo", messages=msgs, **kw).choices[0].message.content
        ),
        "completion stream": lambda: "".join(
            c.choices[0].delta.content or ""
            for c in litellm.completion(model="openai/lo", messages=msgs, stream=True, **kw)
        ),
        "text_completion": lambda: (
            litellm.text_completion(model="text-completion-openai/lo", prompt="Once upon a time", **kw)
            .choices[0]
            .text
        ),
    }


def main() -> int:
    from paradapt.serve.process import ServerProcess

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir, root, template = _setup(tmp)
        server = ServerProcess(
            ["--model", str(model_dir), "--adapter-root", str(root), "--chat-template", str(template)]
        )
        try:
            server.wait_healthy(120)
            base = f"{server.url}/v1"
            clients = {
                "openai": lambda: _openai(base),
                "lm-eval": lambda: _lm_eval(base, model_dir, tmp),
                "langchain-openai": lambda: _langchain(base),
                "litellm": lambda: _litellm(base),
            }
            for client, calls in clients.items():
                try:
                    table = calls()
                except ImportError as e:
                    print(f"{client:16} (all)  not installed ({e.name})")
                    continue
                for call, fn in table.items():
                    try:
                        got = f"works: {fn()!r}"[:90]
                    except Exception as e:  # noqa: BLE001 - the table reports every failure
                        what = "refused, as documented" if "(refused)" in call else "FAILS"
                        got = f"{what}: {type(e).__name__}: {str(e)[:160]}"
                    print(f"{client:16} {call:40} {got}", flush=True)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

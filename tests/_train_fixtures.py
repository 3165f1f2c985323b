"""Tiny Hugging Face model folders and data files for the ``paradapt train`` tests (no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(40)] + ["good", "bad", "the", "a", "movie", "plot"]


def save_tokenizer(path: Path, cls_sep: bool) -> int:
    """A word-level tokenizer over WORDS; BERT-style [CLS] ... [SEP] when ``cls_sep``."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if cls_sep:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
    kw = {"cls_token": "[CLS]", "sep_token": "[SEP]"} if cls_sep else {"eos_token": "</s>"}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", model_max_length=64, **kw
    )
    fast.save_pretrained(path)
    return len(vocab)


# A ChatML template (SmolLM2's shape): "<|im_start|>role\ncontent<|im_end|>\n" per message.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_WORDS = ["user", "assistant", "system", "positive", "negative", "review", "answer"]


def save_chat_tokenizer(path: Path, template: str | None = CHATML) -> int:
    """A word-level tokenizer over WORDS + CHAT_WORDS with ChatML's special tokens and ``template``.

    EOS is ``<|im_end|>``, the end of a turn, as in SmolLM2.
    """
    specials = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS + CHAT_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=64,
    )
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(path)
    return len(vocab)


def make_chat_llama(path: Path, template: str | None = CHATML) -> Path:
    """A 2-layer random Llama folder whose tokenizer has a chat template."""
    return save_tiny_llama(path, save_chat_tokenizer(path, template), eos_token_id=3, initializer_range=0.2)


def write_sentiment_tsv(path: Path, n: int, seed: int = 0) -> Path:
    """``sentence<TAB>label`` rows as in SST-2: label 1 when the sentence holds 'good', else 0."""
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        words = [rng.choice(WORDS[:40]) for _ in range(rng.randint(2, 6))]
        y = rng.random() < 0.5
        words.insert(rng.randrange(len(words)), "good" if y else "bad")
        lines.append(f"{' '.join(words)}\t{int(y)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def make_bert(path: Path) -> Path:
    """A 2-layer random BERT encoder folder."""
    n = save_tokenizer(path, cls_sep=True)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=n,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(path)
    return path


def save_tiny_llama(path: Path, vocab_size: int, **overrides) -> Path:
    """A 2-layer random Llama (seed 0) saved to ``path``, next to a tokenizer already there."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        **overrides,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def make_llama(path: Path) -> Path:
    """A 2-layer random Llama folder."""
    return save_tiny_llama(path, save_tokenizer(path, cls_sep=False), eos_token_id=4)


def write_cls_jsonl(path: Path, n: int, seed: int = 0, labels=("neg", "pos")) -> Path:
    """Sentences whose label is whether they contain 'good' (learnable by a head)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = [rng.choice(WORDS[:40]) for _ in range(rng.randint(3, 8))]
            y = rng.random() < 0.5
            words.insert(rng.randrange(len(words)), "good" if y else "bad")
            f.write(json.dumps({"text": " ".join(words), "label": labels[int(y)]}) + "\n")
    return path


def write_lm_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """Short documents with a repeated pattern (an LM adapter can lower their loss)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            start = rng.randrange(30)
            f.write(json.dumps({"text": " ".join(WORDS[start : start + 5] * 2)}) + "\n")
    return path


def cls_config(model: Path, data: Path, out: Path, **train) -> dict:
    """A one-adapter classification config dict (eval on 25% of the data)."""
    return {
        "model": str(model),
        "output_dir": str(out),
        "adapter": {
            "name": "cls",
            "kind": "parallel",
            "config": {"r": 8, "head": {"labels": ["neg", "pos"], "dropout": 0.0}},
            "data": {"path": str(data)},
            "eval_fraction": 0.25,
        },
        "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-2, "log_every": 1, **train},
    }


def lm_config(model: Path, data: Path, out: Path, **train) -> dict:
    """A one-adapter LM config dict with LoRA dropout (so resume must restore the RNG)."""
    return {
        "model": str(model),
        "output_dir": str(out),
        "adapters": [
            {
                "name": "lm",
                "kind": "lora",
                "config": {"r": 4, "dropout": 0.1, "init": "random"},
                "data": {"path": str(data)},
                "eval_fraction": 0.2,
            }
        ],
        "tokenize": {"max_length": 16},
        "train": {"max_steps": 8, "batch_size": 4, "lr": 1e-2, "log_every": 1, "warmup_steps": 2, **train},
    }


def losses(metrics: Path) -> list[tuple[int, dict]]:
    """(step, per-adapter loss) of every loss record in a metrics.jsonl."""
    out = []
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out.append((r["step"], r["loss"]))
    return out

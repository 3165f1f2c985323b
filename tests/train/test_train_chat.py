"""Chat training data: conversations rendered with the tokenizer's chat template, the loss on the
assistant's tokens only; rows that do not fit fail naming their file and line; runs lower that loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from _train_fixtures import CHATML, make_chat_llama, save_chat_tokenizer, write_sentiment_tsv
from conftest import asset_path, require_asset

import paradapt as pa
from paradapt.config import CONFIG_CLASSES
from paradapt.errors import ConfigError
from paradapt.loading import load_model
from paradapt.train import Task, TrainArgs, Trainer, lm_loss, train
from paradapt.train.config import load_config
from paradapt.train.data import (
    IGNORE_INDEX,
    DataError,
    DataSpec,
    build_datasets,
    load_records,
    tokenize,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SENTIMENT = {0: "negative", 1: "positive"}
TEMPLATE = "review {text} answer"


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat_tok")
    save_chat_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory):
    return make_chat_llama(tmp_path_factory.mktemp("chat_llama"))


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of learned (not -100) positions, as token id lists."""
    out, run = [], []
    for i, y in zip(ids, labels, strict=True):
        if y == IGNORE_INDEX:
            if run:
                out.append(run)
            run = []
        else:
            assert y == i  # a learned position predicts its own token (the model shifts)
            run.append(i)
    return out + ([run] if run else [])


def chatml_answers(tok, ids: list[int]) -> list[list[int]]:
    """The assistant turns of a ChatML token stream, read off the stream itself: the tokens after
    '<|im_start|> assistant' up to and including '<|im_end|>'."""
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assistant = tok.convert_tokens_to_ids("assistant")
    out = []
    for i in range(len(ids) - 1):
        if ids[i] == start and ids[i + 1] == assistant:
            stop = ids.index(end, i)
            out.append(ids[i + 2 : stop + 1])
    return out


def words(tok, ids: list[int]) -> str:
    return " ".join(tok.convert_ids_to_tokens(ids))


# --------------------------------------------------------------------------- rows -> loss mask


def test_template_rows_with_labels_learn_only_the_answer_word(chat_tok, tmp_path):
    data = write_sentiment_tsv(tmp_path / "train.tsv", 12)
    spec = DataSpec(str(data), text_field="sentence", prompt_template=TEMPLATE, labels=SENTIMENT)
    records = load_records(spec)
    ds = tokenize(records, chat_tok)
    assert ds.task == "chat" and ds.labels.labels == ["negative", "positive"]
    rows = [line.split("\t") for line in data.read_text().splitlines()[1:]]
    for ex, (sentence, label), rec in zip(ds.examples, rows, records, strict=True):
        word = SENTIMENT[int(label)]
        assert rec["messages"] == [
            {"role": "user", "content": f"review {sentence} answer"},
            {"role": "assistant", "content": word},
        ]
        assert spans(ex["input_ids"], ex["labels"]) == [chat_tok.convert_tokens_to_ids([word, "<|im_end|>"])]
        assert words(chat_tok, ex["input_ids"]).startswith(f"<|im_start|> user review {sentence} answer")


def test_multi_turn_messages_mask_every_assistant_turn_and_nothing_else(chat_tok, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "the movie"},
                {"role": "user", "content": "w1 w2"},
                {"role": "assistant", "content": "good w3"},
                {"role": "user", "content": "w4"},
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "bad "}, {"type": "text", "text": "w5"}],
                },
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "w6"},
                {"role": "assistant", "content": "w7"},
                {"role": "user", "content": "w8"},
            ]
        },
    ]
    ds = tokenize(load_records(DataSpec(str(jsonl(tmp_path / "chat.jsonl", rows)))), chat_tok)
    assert ds.task == "chat" and ds.labels is None  # no label words: no accuracy
    for ex in ds.examples:
        assert spans(ex["input_ids"], ex["labels"]) == chatml_answers(chat_tok, ex["input_ids"])
    first = [words(chat_tok, s) for s in spans(ds.examples[0]["input_ids"], ds.examples[0]["labels"])]
    assert first == ["good w3 <|im_end|>", "bad w5 <|im_end|>"]
    # the trailing user turn of row 2 is rendered but not learned
    assert words(chat_tok, ds.examples[1]["input_ids"]).endswith("<|im_start|> user w8 <|im_end|>")
    assert ds.examples[1]["labels"][-1] == IGNORE_INDEX


def test_prompt_completion_as_chat_and_as_plain_completion(chat_tok, tmp_path):
    path = jsonl(tmp_path / "pc.jsonl", [{"prompt": "w1 w2", "completion": "good"}])
    chat = tokenize(load_records(DataSpec(str(path), task="chat", system="the movie")), chat_tok)
    ex = chat.examples[0]
    assert words(chat_tok, ex["input_ids"]) == (
        "<|im_start|> system the movie <|im_end|> <|im_start|> user w1 w2 <|im_end|> "
        "<|im_start|> assistant good <|im_end|>"
    )
    assert [words(chat_tok, s) for s in spans(ex["input_ids"], ex["labels"])] == ["good <|im_end|>"]
    # without task: chat, string prompt/completion pairs stay the plain completion task (unchanged)
    plain = tokenize(load_records(DataSpec(str(path))), chat_tok)
    assert plain.task == "completion" and "<|im_start|>" not in words(
        chat_tok, plain.examples[0]["input_ids"]
    )


def test_conversational_prompt_completion_learns_the_completion_only(chat_tok, tmp_path):
    """TRL's conversational shape: a few-shot assistant turn inside the prompt is not learned."""
    row = {
        "prompt": [
            {"role": "user", "content": "w1"},
            {"role": "assistant", "content": "w2"},
            {"role": "user", "content": "w3"},
        ],
        "completion": [{"role": "assistant", "content": "w4"}],
    }
    ds = tokenize(load_records(DataSpec(str(jsonl(tmp_path / "c.jsonl", [row])))), chat_tok)
    ex = ds.examples[0]
    assert ds.task == "chat" and len(chatml_answers(chat_tok, ex["input_ids"])) == 2
    assert [words(chat_tok, s) for s in spans(ex["input_ids"], ex["labels"])] == ["w4 <|im_end|>"]


def test_system_is_added_once_and_labels_as_a_list_keep_the_label(chat_tok, tmp_path):
    path = tmp_path / "spam.tsv"
    path.write_text("ham\tw1 w2\nspam\tw3\n")
    spec = DataSpec(
        str(path),
        header=False,
        columns=["label", "text"],
        prompt_template="{text}",
        labels=["ham", "spam"],
        system="the movie",
    )
    recs = load_records(spec)
    assert [r["answer"] for r in recs] == ["ham", "spam"]
    assert [m["role"] for m in recs[0]["messages"]] == ["system", "user", "assistant"]
    own = jsonl(
        tmp_path / "own.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "a"},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            }
        ],
    )
    recs = load_records(DataSpec(str(own), system="the movie"))
    assert [m["content"] for m in recs[0]["messages"]] == ["a", "b", "c"]


def test_real_tokenizer_with_a_llama2_style_template():
    """stories260K's SentencePiece tokenizer: the mask is the answer and </s>, token for token."""
    require_asset(asset_path("models", "stories260k-hf"), "stories260k-hf tokenizer")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(asset_path("models", "stories260k-hf")))
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    rec = {
        "messages": [
            {"role": "user", "content": "Was the story happy?"},
            {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "And the dog?"},
            {"role": "assistant", "content": "sad"},
        ],
        "train_from": 0,
    }
    ex = tokenize([rec], tok).examples[0]
    answers = [tok.decode(s) for s in spans(ex["input_ids"], ex["labels"])]
    assert answers == ["yes</s>", "sad</s>"]
    assert (
        ex["input_ids"]
        == tok(tok.apply_chat_template(rec["messages"], tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
    )


# --------------------------------------------------------------------------- bad input


def test_rows_that_do_not_fit_fail_naming_file_and_line(chat_tok, tmp_path):
    tsv = tmp_path / "rows.tsv"
    tsv.write_text("sentence\tlabel\nw1 good\t1\nw2 bad\t7\n")
    spec = DataSpec(str(tsv), text_field="sentence", prompt_template=TEMPLATE, labels=SENTIMENT)
    with pytest.raises(DataError, match=r"rows\.tsv:3: label '7' has no answer word"):
        load_records(spec)
    missing = DataSpec(str(tsv), prompt_template="{text} {title}", text_field="sentence")
    with pytest.raises(DataError, match=r"rows\.tsv:2: prompt_template needs field 'title'"):
        load_records(missing)
    long = tmp_path / "long.tsv"
    long.write_text("sentence\tlabel\nw1\t0\n" + "w1 " * 80 + "\t1\n")
    recs = load_records(
        DataSpec(str(long), text_field="sentence", prompt_template=TEMPLATE, labels=SENTIMENT)
    )
    with pytest.raises(DataError, match=r"long\.tsv:3: the conversation is \d+ tokens .* over max_length=64"):
        tokenize(recs, chat_tok)
    bad = [
        ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\]\.role must be one of"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message to learn from"),
        ({"messages": "hi"}, "'messages' must be a non-empty list"),
        (
            {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]},
            r"messages\[0\]\.content must be a string",
        ),
    ]
    good = {"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}
    for row, message in bad:
        path = jsonl(tmp_path / "bad.jsonl", [good, row])
        with pytest.raises(DataError, match=rf"bad\.jsonl:2: {message}"):
            load_records(DataSpec(str(path)))
    with pytest.raises(DataError, match=r"pc\.jsonl:1: missing field 'completion'"):
        load_records(DataSpec(str(jsonl(tmp_path / "pc.jsonl", [{"prompt": "x"}])), task="chat"))


def test_a_template_that_is_not_prefix_consistent_fails_naming_the_line(tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    # marks the last message, so the conversation up to a turn is not the start of the whole one
    save_chat_tokenizer(
        folder, "{% for m in messages %}{% if loop.last %}system {% endif %}{{ m['content'] }} {% endfor %}"
    )
    tok = AutoTokenizer.from_pretrained(str(folder))
    path = jsonl(
        tmp_path / "t.jsonl",
        [{"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}],
    )
    with pytest.raises(
        DataError, match=r"t\.jsonl:1: the chat template is not prefix-consistent at assistant turn 1"
    ):
        tokenize(load_records(DataSpec(str(path))), tok)
    save_chat_tokenizer(folder, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match=r"t\.jsonl:1: the chat template failed .*roles must alternate"):
        tokenize(load_records(DataSpec(str(path))), AutoTokenizer.from_pretrained(str(folder)))


def test_no_chat_template_is_a_config_error(tmp_path):
    from transformers import AutoTokenizer

    save_chat_tokenizer(tmp_path / "plain", template=None)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "plain"))
    path = jsonl(
        tmp_path / "c.jsonl",
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
    )
    with pytest.raises(ConfigError, match="model: the model's tokenizer has no chat template"):
        tokenize(load_records(DataSpec(str(path))), tok)


def test_chat_keys_are_checked(tmp_path):
    path = str(tmp_path / "x.tsv")
    with pytest.raises(ConfigError, match=r"data\.prompt_template: must be a string holding \{text\}"):
        DataSpec(path, prompt_template="no placeholder")
    with pytest.raises(
        ConfigError, match=r"data\.labels: a mapping of labels to answer words needs a prompt_template"
    ):
        DataSpec(path, labels={0: "negative"})
    with pytest.raises(
        ConfigError, match=r"data\.prompt_template: .* the task is 'chat', not 'classification'"
    ):
        DataSpec(path, task="classification", prompt_template="{text}")
    with pytest.raises(ConfigError, match=r"data\.labels: label '0' is given twice"):
        DataSpec(path, prompt_template="{text}", labels={0: "a", "0": "b"})
    with pytest.raises(ConfigError, match=r"data\.labels\.1: the answer must be a non-empty string"):
        DataSpec(path, prompt_template="{text}", labels={0: "a", 1: ""})
    with pytest.raises(ConfigError, match=r"data\.system: is a chat system message, but the task is 'lm'"):
        DataSpec(path, task="lm", system="be nice")
    Path(path).write_text("text\tlabel\nw1\t0\n")
    with pytest.raises(ConfigError, match=r"data\.system: .* but the rows are for task 'classification'"):
        load_records(DataSpec(path, system="be nice"))


# --------------------------------------------------------------------------- training


def chat_config(model: Path, tmp_path: Path, kind: str = "parallel", **train_kw) -> dict:
    write_sentiment_tsv(tmp_path / "train.tsv", 96, seed=0)
    write_sentiment_tsv(tmp_path / "test.tsv", 24, seed=1)
    config = {
        "parallel": {"r": 8},
        "series": {"r": 8},
        "lora": {"r": 8},
        "prefix": {"num_virtual_tokens": 4},
        "mam": {"num_virtual_tokens": 4, "r": 8},
    }
    return {
        "model": str(model),
        "output_dir": str(tmp_path / "run"),
        "adapter": {
            "name": "sst",
            "kind": kind,
            "config": config.get(kind, {}),
            "data": {
                "path": "train.tsv",
                "text_field": "sentence",
                "prompt_template": TEMPLATE,
                "labels": SENTIMENT,
            },
            "eval_data": {"path": "test.tsv", "text_field": "sentence"},  # takes data's template and labels
        },
        "tokenize": {"max_length": 32},
        "train": {
            "max_steps": 30,
            "batch_size": 16,
            "lr": 1e-2,
            "log_every": 1,
            "eval_every": 15,
            **train_kw,
        },
    }


def test_yaml_run_lowers_the_masked_loss_and_reports_answer_accuracy(chat_llama, tmp_path):
    path = tmp_path / "chat.yaml"
    path.write_text(
        yaml.safe_dump(chat_config(chat_llama, tmp_path, "lora", max_steps=60, lr=3e-2, eval_every=20))
    )
    result = train(str(path), progress=False)
    evals = [r["eval"]["sst"] for r in result.history if "eval" in r]
    first = next(r["loss"]["sst"] for r in result.history if "loss" in r)
    assert evals[-1]["loss"] < 0.2 * first
    # the answer depends on 'good'/'bad' anywhere in the review: attention (LoRA on q, v) finds it
    assert evals[0]["accuracy"] < 0.75 and evals[-1]["accuracy"] >= 0.9
    assert set(evals[-1]) == {"loss", "perplexity", "accuracy"}
    assert result.adapters["sst"].is_dir() and result.metrics["sst"] == evals[-1]


@pytest.mark.parametrize("kind", sorted(CONFIG_CLASSES))
def test_every_adapter_kind_lowers_the_masked_loss(kind, chat_llama, tmp_path):
    cfg = chat_config(chat_llama, tmp_path, kind, max_steps=8, eval_every=0, lr=2e-2)
    cfg["adapter"]["data"]["path"] = str(tmp_path / "train.tsv")
    cfg["adapter"]["eval_data"]["path"] = str(tmp_path / "test.tsv")
    result = train(cfg, progress=False)
    steps = [r["loss"]["sst"] for r in result.history if "loss" in r]
    assert steps[-1] < steps[0], steps


def test_eval_accuracy_is_greedy_generation_of_the_label_word(chat_llama, tmp_path):
    """The accuracy the trainer reports equals decoding each eval prompt greedily and comparing."""
    tok, model = load_model(chat_llama)
    cfg, base = load_config(chat_config(chat_llama, tmp_path))
    train_spec, eval_spec = cfg.data_specs(0, tmp_path)
    train_ds, eval_ds = build_datasets(train_spec, tok, eval_spec=eval_spec, max_length=32)
    torch.manual_seed(0)
    pa.add_adapter(model, "sst", pa.LoRAConfig(r=8))
    trainer = Trainer(
        model, [Task("sst", train_ds, eval_ds)], TrainArgs(max_steps=30, batch_size=16, lr=3e-2)
    )
    trainer.train(progress=False)
    reported = trainer.evaluate()["sst"]["accuracy"]
    model.eval()
    pa.set_active(model, "sst")
    hits = 0
    for rec in load_records(eval_spec):
        prompt = tok.apply_chat_template(rec["messages"][:-1], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        out = model.generate(
            ids, max_new_tokens=3, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0
        )
        new = out[0, ids.shape[1] :].tolist()
        hits += new[
            : new.index(tok.eos_token_id) + 1 if tok.eos_token_id in new else None
        ] == tok.convert_tokens_to_ids([rec["answer"], "<|im_end|>"])
    assert reported == hits / len(eval_ds) and 0 < reported < 1


def test_mixed_chat_and_lm_adapters_share_a_run_but_not_with_classification(chat_llama, tmp_path):
    cfg = chat_config(chat_llama, tmp_path, max_steps=2, eval_every=0)
    lm = jsonl(tmp_path / "lm.jsonl", [{"text": "w1 w2 w3 w4"}] * 8)
    cls = jsonl(tmp_path / "cls.jsonl", [{"text": "w1", "label": "a"}, {"text": "w2", "label": "b"}])
    cfg["adapters"] = [cfg.pop("adapter"), {"name": "lm", "kind": "lora", "data": str(lm)}]
    result = train(_abs(cfg, tmp_path), progress=False)
    assert set(result.adapters) == {"sst", "lm"}
    cfg["adapters"][1] = {"name": "cls", "kind": "lora", "data": str(cls)}
    with pytest.raises(
        ConfigError, match=r"adapters\.1\.data: all adapters of one run need the same kind of loss"
    ):
        train(_abs(cfg, tmp_path), progress=False, overwrite=True)


def _abs(cfg: dict, folder: Path) -> dict:
    """The config with the adapters' relative data paths made absolute (a dict has no file folder)."""
    for a in cfg["adapters"]:
        for key in ("data", "eval_data"):
            spec = a.get(key)
            if isinstance(spec, dict) and not Path(spec["path"]).is_absolute():
                spec["path"] = str(folder / spec["path"])
    return cfg


def test_example_config_runs_on_a_tiny_model(chat_llama, tmp_path):
    """examples/train_chat_sst2.yaml as written (SST-2 from the assets), on a tiny chat Llama."""
    require_asset(asset_path("data", "sst2"), "SST-2 data")
    example = EXAMPLES / "train_chat_sst2.yaml"
    cfg, _ = load_config(example)
    assert cfg.model == "smollm2-135m-instruct"
    result = train(
        str(example),
        progress=False,
        **{
            "model": str(chat_llama),
            "output_dir": str(tmp_path / "run"),
            "train.max_steps": 2,
            "train.batch_size": 4,
            "adapters.0.data.limit": 16,
            "adapters.0.eval_data.limit": 8,
        },
    )
    assert set(result.metrics["sst2"]) == {"loss", "perplexity", "accuracy"}


def test_chatml_fixture_matches_smollm2_shape(chat_tok):
    """The fixture's template renders ChatML as SmolLM2's does (role line, content, <|im_end|>)."""
    text = chat_tok.apply_chat_template(
        [{"role": "user", "content": "w1"}], tokenize=False, add_generation_prompt=True
    )
    assert (
        text == "<|im_start|>user\nw1<|im_end|>\n<|im_start|>assistant\n" and chat_tok.chat_template == CHATML
    )


def _numbers(d) -> list[float]:
    """Every number in a (nested) history record, in order."""
    if isinstance(d, dict):
        return [x for k in sorted(d) for x in _numbers(d[k])]
    return [float(d)] if isinstance(d, int | float) else []


def test_the_trainer_runs_the_head_in_chunks_with_the_same_losses(chat_llama, tmp_path, monkeypatch):
    """With many learned positions the trainer's LM loss runs the head in chunks
    (train/lm_loss.py); training and evaluation come out as with the whole head."""

    def run(out: str) -> list[dict]:
        cfg = chat_config(chat_llama, tmp_path, "lora", max_steps=4, eval_every=2)
        cfg["adapter"]["data"]["path"] = str(tmp_path / "train.tsv")
        cfg["adapter"]["eval_data"]["path"] = str(tmp_path / "test.tsv")
        cfg["output_dir"] = str(tmp_path / out)
        torch.manual_seed(0)
        result = train(cfg, progress=False)
        return [{k: r[k] for k in ("loss", "eval") if k in r} for r in result.history]

    whole = run("whole")
    chunks = []
    real = lm_loss._head_loss
    monkeypatch.setattr(lm_loss, "_head_loss", lambda *a: chunks.append(1) or real(*a))
    monkeypatch.setattr(lm_loss, "CHUNK_BYTES", 1)  # one position per chunk
    chunked = run("chunked")
    assert len(chunks) >= 4 * 16, "the chunked path ran, a chunk per learned position"
    assert [sorted(r) for r in whole] == [sorted(r) for r in chunked]
    assert _numbers({"h": dict(enumerate(chunked))}) == pytest.approx(_numbers({"h": dict(enumerate(whole))}), rel=1e-4)

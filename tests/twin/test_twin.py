"""The digital twin: same decisions as the real engine, cost-model fit and files, CLI, bad input."""

from __future__ import annotations

import json
import random
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import tiny_model

from paradapt import cli
from paradapt.errors import ConfigError
from paradapt.serve.core import StepShape, memory_split, step_shape
from paradapt.serve.engine import Engine, EngineConfig
from paradapt.serve.workload import WorkloadSpec
from paradapt.twin import (
    CostModel,
    CostModelMismatch,
    RealBackend,
    SimBackend,
    SimEngine,
    replay,
    simulate,
    summarize,
)
from paradapt.twin.costmodel import BASE_FEATURES, MixtureCost, featurize, fit_linear, kind_features
from paradapt.twin.profile import build_adapter_root, clear_adapters

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

COST = CostModel.from_coefficients(
    {
        "step": 0.004,
        "tokens": 2e-4,
        "seqs": 3e-4,
        "samplers": 1e-4,
        "attention": 1e-6,
        "device_loads": 5e-4,
        "adapters_lora": 1e-3,
        "rank_tokens_lora": 1e-6,
        "adapters_parallel": 2e-3,
        "rank_tokens_parallel": 2e-6,
        "adapters_series": 1.5e-3,
        "rank_tokens_series": 3e-6,
    },
    moves={"load_host": (0.02, 0.0), "load_device": (0.005, 0.0), "evict_device": (0.001, 0.0)},
)

# A busy tiny engine: 6 adapters behind 2 slots and 3 host copies, chunked prompts, a quick starvation guard.
SPEC = WorkloadSpec(
    num_adapters=6,
    rate=60.0,
    duration=0.6,
    alpha=0.3,
    input_len=(2, 30),
    output_len=(2, 12),
    ranks=[4, 8],
    kinds=["lora", "parallel", "series"],
    seed=3,
)
KNOBS = dict(page_size=4, num_blocks=40, token_budget=16, max_running=5, starvation_after=0.05, prefetch=2)


class FakeClock:
    """The real engine's clock, advanced by the cost model instead of the wall."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class ModelledTimeBackend(RealBackend):
    """The real backend, but waiting for an arrival moves the fake clock instead of sleeping."""

    def wait_until(self, t: float) -> None:
        self.clock.t = max(self.clock.t, t)


def real_engine_on_modelled_time(tmp_path, spec: WorkloadSpec, cost: CostModel, **knobs):
    """A real Engine (tiny Llama, real adapter folders and forwards) whose clock advances exactly as the
    twin's: each move by its modelled time, each step by the cost model's time of its shape."""
    workload = spec.generate()
    model = tiny_model("llama")
    build_adapter_root(model, tmp_path / "adapters", workload.adapters)
    clear_adapters(model)
    clock = FakeClock()
    engine = Engine(
        model, tmp_path / "adapters", EngineConfig(max_served=3, max_slots=2, **knobs), clock=clock
    )
    info = {a.name: (a.kind, a.rank) for a in workload.adapters}
    store, execute, loads = engine.store, engine.runner.execute, [0]

    def load(move):
        store(move)
        clock.t += cost.move_time(move.op, move.size)
        loads[0] += move.op == "load_device"

    def run(plan):
        shape = step_shape(engine.scheduler, plan, loads[0], len(engine.cache.on_device))
        out = execute(plan)
        clock.t += cost.step_time(shape, info)
        loads[0] = 0
        return out

    engine._loader, engine.runner.execute = load, run
    return workload, engine, clock


def test_twin_takes_the_real_engines_decisions_step_by_step(tmp_path):
    workload, engine, clock = real_engine_on_modelled_time(tmp_path, SPEC, COST, **KNOBS)
    real = replay(workload, ModelledTimeBackend(engine, clock, vocab=96), drain=5.0)
    twin_engine = SimEngine(workload, COST, EngineConfig(max_served=3, max_slots=2, **KNOBS))
    twin = replay(workload, SimBackend(twin_engine), drain=5.0)

    assert len(real.steps) > 30 and real.stats.device_evictions > 0  # busy: slots turn over
    assert twin.steps == real.steps  # same requests, same chunks, same times, step after step
    assert twin.first == real.first and twin.finished == real.finished
    counts = lambda s: {k: v for k, v in vars(s).items() if not k.startswith("bytes")}  # noqa: E731
    assert counts(twin.stats) == counts(real.stats)  # same loads, hits and evictions (sizes are modelled)
    r, t = summarize(real), summarize(twin)
    assert t.row() == r.row() and t.served_fraction == r.served_fraction
    assert len(real.finished) == len(workload.requests)  # everything ran, on both


def test_simulate_is_torch_free_and_deterministic():
    code = (
        "import sys; from paradapt.twin import CostModel, simulate; "
        "from paradapt.serve.workload import WorkloadSpec; "
        "r = simulate(WorkloadSpec(num_adapters=20, rate=5, duration=5), CostModel.from_coefficients({'step': 0.01, "
        "'tokens': 1e-4}), max_served=4, max_slots=2); assert 'torch' not in sys.modules; print(r.throughput)"
    )
    import subprocess

    out = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in (0, 1)
    ]
    assert out[0] == out[1] and float(out[0]) > 0


def test_more_slots_help_a_skewed_overloaded_workload_and_starvation_is_flagged():
    spec = WorkloadSpec(
        num_adapters=40, rate=20.0, duration=10.0, alpha=1.0, input_len=(8, 64), output_len=(8, 32)
    )
    one = simulate(spec, COST, max_served=8, max_slots=1)
    many = simulate(spec, COST, max_served=8, max_slots=8)
    assert many.throughput > one.throughput
    assert one.ideal_throughput == many.ideal_throughput == spec.generate().offered_tokens() / spec.duration
    assert not one.starvation_free and one.throughput < 0.9 * one.ideal_throughput
    assert set(many.served_fraction) <= {a.name for a in spec.generate().adapters}
    assert 0 <= many.min_served_fraction <= 1


def test_device_memory_makes_slots_cost_kv_pages(tmp_path):
    split = [
        memory_split(EngineConfig(max_slots=k, max_served=8, device_memory=2**20), 1024, 4096)
        for k in (1, 4, 8)
    ]
    assert [s.num_blocks for s in split] == [(2**20 - k * 4096) // 1024 // 16 for k in (1, 4, 8)]
    assert [s.device_bytes for s in split] == [4096, 4 * 4096, 8 * 4096]
    assert memory_split(EngineConfig(), 1024, 4096).device_bytes is None  # off by default
    model = tiny_model("llama")
    workload = SPEC.generate()
    build_adapter_root(model, tmp_path / "a", workload.adapters)
    clear_adapters(model)
    kv = []
    for k in (1, 3):
        cfg = EngineConfig(page_size=4, max_slots=k, max_served=3, device_memory=400_000)
        kv.append(Engine(model, tmp_path / "a", cfg).scheduler.config.kv_tokens)
    assert kv[1] < kv[0]  # two more slots of the largest adapter, fewer KV tokens
    with pytest.raises(Exception, match="max_slots.*no room for the KV"):
        Engine(model, tmp_path / "a", EngineConfig(page_size=4, max_slots=3, max_served=3, device_memory=100))


def test_engine_trace_records_each_steps_shape_and_moves(tmp_path):
    from paradapt.serve.sampling import SamplingParams

    model = tiny_model("llama")
    workload = SPEC.generate()
    build_adapter_root(model, tmp_path / "a", workload.adapters)
    clear_adapters(model)
    engine = Engine(
        model, tmp_path / "a", EngineConfig(page_size=4, num_blocks=40, token_budget=16, max_running=4)
    )
    engine.run()
    assert engine.trace is None  # off by default
    engine.enable_trace()
    names = [a.name for a in workload.adapters]
    for i in range(5):
        engine.add_request(
            list(range(3, 3 + 7 * i + 1)), names[i], SamplingParams(max_new_tokens=3, ignore_eos=True)
        )
    engine.run()
    shapes = [t.shape for t in engine.trace]
    assert sum(s.prefill_tokens for s in shapes) == sum(7 * i + 1 for i in range(5))
    assert sum(s.samplers for s in shapes) == 5 * 3
    loaded = [m.adapter for t in engine.trace for m in t.moves if m.op == "load_device"]
    assert sorted(set(loaded)) == sorted(names[:5]) and all(t.seconds > 0 for t in engine.trace)


def test_packed_attention_prices_only_steps_with_prompt_tokens():
    """A decode-only step attends per request on the CPU (lean_decode): its attention is the sum
    over requests (``attention``), not the packed row's tokens x context."""
    decode = StepShape(0, 0, decodes=8, samplers=8, attention=800, context=808, adapter_tokens=((None, 8),))
    mixed = StepShape(16, 1, decodes=8, samplers=9, attention=1200, context=824, adapter_tokens=((None, 24),))
    assert featurize(decode, {}, ())["packed_attention"] == 0.0
    assert featurize(mixed, {}, ())["packed_attention"] == 24 * 824
    assert featurize(decode, {}, ())["attention"] == 800
    # an engine that attends per request in every step (the CPU's) has no packed row to price
    assert featurize(mixed, {}, (), packed_prompts=False)["packed_attention"] == 0.0
    assert featurize(mixed, {}, (), packed_prompts=False)["attention"] == 1200


def test_a_cost_model_profiled_on_the_cpu_prices_no_packed_row():
    from paradapt.twin.costmodel import CostModel

    mixed = StepShape(16, 1, decodes=8, samplers=9, attention=1200, context=824, adapter_tokens=((None, 24),))
    coef = {"step": 1e-3, "packed_attention": 1e-6}
    cpu = CostModel.from_dict({**CostModel.from_coefficients(coef).to_dict(), "fingerprint": {"device": "cpu"}})
    gpu = CostModel.from_dict({**CostModel.from_coefficients(coef).to_dict(), "fingerprint": {"device": "H100"}})
    assert cpu.step_time(mixed, {}) == pytest.approx(1e-3)
    assert gpu.step_time(mixed, {}) == pytest.approx(1e-3 + 24 * 824 * 1e-6)


def test_a_mixture_step_is_priced_by_its_tokens_times_experts_evaluated():
    """A mixture's tokens count once per expert they evaluate (top_k, or all for a dense gate),
    its experts count as adapters of the step (once, also when routed by name) with their
    expected rank-tokens, and the mixture terms price the step on top."""
    info = {"l4": ("lora", 4), "l8": ("lora", 8), "p": ("parallel", 16)}
    info["top1"] = MixtureCost(("l4", "l8"), 1)
    info["dense"] = MixtureCost(("l4", "l8"), 2)
    shape = StepShape(10, 1, 2, 3, 200, 30, (("top1", 6), ("l4", 3), ("p", 2), (None, 1)))
    f = featurize(shape, info, ("lora", "parallel"))
    assert f["mixtures"] == 1 and f["mixture_tokens"] == 6
    assert f["adapters_lora"] == 2 and f["adapters_parallel"] == 1  # l4 once, though routed by name too
    assert f["rank_tokens_lora"] == 3 * 4 + 6 * (4 + 8) / 2 and f["rank_tokens_parallel"] == 32
    dense = featurize(StepShape(10, 1, 2, 3, 200, 30, (("dense", 6),)), info, ("lora",))
    assert dense["mixture_tokens"] == 12 and dense["rank_tokens_lora"] == 6 * (4 + 8)
    cost = CostModel.from_coefficients({**COST.step, "mixtures": 1e-3, "mixture_tokens": 1e-5})
    plain = StepShape(10, 1, 2, 3, 200, 30, (("l4", 6),))
    assert cost.step_time(shape, info) > cost.step_time(plain, info)
    with_mix = cost.step_time(StepShape(10, 1, 2, 3, 200, 30, (("dense", 6),)), info)
    by_hand = COST.step_time(StepShape(10, 1, 2, 3, 200, 30, (("l4", 6), ("l8", 6))), info) + 1e-3 + 12e-5
    assert with_mix == pytest.approx(by_hand)
    with pytest.raises(Exception, match="kind 'parallel'"):  # an expert of a kind not profiled
        featurize(shape, info, ("lora",))


def test_steps_bend_at_the_few_rows_kernel_reach():
    """Below the engine's few-rows kernel reach (serve/layer_gemm.py) a token costs ``few_rows``
    more, above it that is a constant: the profile records the reach, an older file has none."""
    decode = lambda n: StepShape(0, 0, decodes=n, samplers=n, attention=10 * n, context=10 * n, adapter_tokens=((None, n),))  # noqa: E731
    assert [featurize(decode(n), {}, (), kernel_rows=8)["few_rows"] for n in (1, 8, 9, 32)] == [1.0, 8.0, 8.0, 8.0]
    assert featurize(decode(4), {}, ())["few_rows"] == 0.0  # no kernel: no bend
    coefs = {"step": 1e-3, "tokens": 1e-4, "few_rows": 5e-5}
    old = CostModel.from_coefficients(coefs)
    bent = replace(old, fit={"kernel_rows": 8})
    assert old.kernel_rows == 0 and bent.kernel_rows == 8
    assert bent.step_time(decode(4), {}) - old.step_time(decode(4), {}) == pytest.approx(4 * 5e-5)
    assert bent.step_time(decode(32), {}) - old.step_time(decode(32), {}) == pytest.approx(8 * 5e-5)
    assert CostModel.from_dict(bent.to_dict()).kernel_rows == 8


def test_cost_fit_recovers_known_coefficients():
    kinds = ("lora", "parallel", "series")
    rng = random.Random(0)
    truth = {n: rng.uniform(1e-6, 1e-3) for n in (*BASE_FEATURES, *kind_features(kinds))}
    truth["attention"] = 3e-8
    truth["context"] = 2e-7
    truth["packed_attention"] = 1e-9
    info = {f"a{i}": (kinds[i % 3], rng.choice([8, 16, 32])) for i in range(12)}
    info["m1"] = MixtureCost(("a0", "a3", "a6"), 1)  # learned mixtures over some of them
    info["m2"] = MixtureCost(("a1", "a4"), 2)
    rows, ys = [], []
    names = list(truth)
    for _ in range(300):
        used = rng.sample(list(info), rng.randint(0, 5))
        per = tuple((a, rng.randint(1, 40)) for a in used) + ((None, rng.randint(1, 9)),)
        tok = sum(n for _, n in per)
        shape = StepShape(
            prefill_tokens=tok - 3,
            prefill_seqs=rng.randint(0, 3),
            decodes=3,
            samplers=rng.randint(1, 6),
            attention=rng.randint(0, 20000),
            context=rng.randint(0, 4000),
            adapter_tokens=per,
            device_loads=rng.randint(0, 2),
            resident=rng.randint(0, 16),
        )
        f = featurize(shape, info, kinds, kernel_rows=16)  # steps of <= 16 tokens bend (few_rows)
        rows.append([f[n] for n in names])
        ys.append(sum(truth[n] * f[n] for n in names))
    coef = fit_linear(rows, ys)
    for n, c in zip(names, coef, strict=True):
        assert c == pytest.approx(truth[n], rel=1e-5), n
    moves = fit_linear(
        [(1.0, float(s)) for s in range(1000, 50000, 1000)],
        [0.002 + 3e-9 * s for s in range(1000, 50000, 1000)],
        relative=False,
    )
    assert moves == pytest.approx([0.002, 3e-9], rel=1e-6)


def test_cost_model_json_round_trip_and_predictions(tmp_path):
    path = COST.save(tmp_path / "cost.json")
    back = CostModel.load(path)
    assert back.to_dict() == COST.to_dict()
    shape = StepShape(10, 1, 2, 3, 200, 30, (("x", 12),))
    assert back.step_time(shape, {"x": ("lora", 8)}) == COST.step_time(shape, {"x": ("lora", 8)}) > 0
    assert back.move_time("load_host", 10**6) == pytest.approx(0.02)
    with pytest.raises(Exception, match="kind 'ia3'"):
        COST.step_time(shape, {"x": ("ia3", 8)})
    with pytest.raises(Exception, match="step.tokens"):
        CostModel({"tokens": -1.0}, {}, {"lora": (1.0, 0.0)})
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(Exception, match="not a paradapt cost model"):
        CostModel.load(tmp_path / "bad.json")


def test_a_cost_file_from_another_machine_warns_naming_both(tmp_path):
    cm = CostModel.from_dict({**COST.to_dict(), "fingerprint": {"cpu": "Xeon 9000", "model_config": "abc"}})
    path = cm.save(tmp_path / "cost.json")
    with pytest.warns(CostModelMismatch, match="Xeon 9000.*EPYC 1"):
        CostModel.load(path, expect={"cpu": "EPYC 1", "model_config": "abc"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CostModel.load(path, expect={"cpu": "Xeon 9000", "model_config": "abc"})  # same: silent


def test_cli_twin_prints_the_metrics(tmp_path, capsys):
    cost = COST.save(tmp_path / "cost.json")
    out_json = tmp_path / "m.json"
    argv = [
        "twin",
        str(EXAMPLES / "workload.yaml"),
        "--max-served",
        "8",
        "--max-slots",
        "4",
        "--cost",
        str(cost),
    ]
    assert cli.main([*argv, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    for word in (
        "throughput",
        "ideal throughput",
        "starvation-free",
        "TTFT p50 / p90",
        "TPOT",
        "adapter loads",
        "served fraction",
    ):
        assert word in out
    saved = json.loads(out_json.read_text())
    assert saved["throughput"] > 0 and saved["served_fraction"]


@pytest.mark.parametrize(
    "text, field",
    [
        ("rate: 2\nduration: 10\n", "num_adapters"),
        ("num_adapters: 4\nrate: -1\nduration: 10\n", "rate"),
        ("num_adapters: 4\nrate: 1\nduration: 10\ninput_len: [50, 10]\n", "input_len"),
        ("num_adapters: 4\nrate: 1\nduration: 10\nalpah: 1\n", "alpah"),
    ],
)
def test_cli_twin_bad_workload_is_one_line_naming_the_field(tmp_path, capsys, text, field):
    (tmp_path / "w.yaml").write_text(text)
    cost = COST.save(tmp_path / "cost.json")
    assert (
        cli.main(
            ["twin", str(tmp_path / "w.yaml"), "--max-served", "2", "--max-slots", "1", "--cost", str(cost)]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and field in err and "w.yaml" in err


def test_cli_twin_bad_knobs_and_cost_file(tmp_path, capsys):
    cost = COST.save(tmp_path / "cost.json")
    w = str(EXAMPLES / "workload.yaml")
    assert cli.main(["twin", w, "--max-served", "2", "--max-slots", "3", "--cost", str(cost)]) == 2
    assert "max_slots" in capsys.readouterr().err
    assert (
        cli.main(["twin", w, "--max-served", "2", "--max-slots", "1", "--cost", str(tmp_path / "none.json")])
        == 2
    )
    assert "none.json" in capsys.readouterr().err


def test_profile_measures_a_cost_model_on_the_real_engine(tmp_path):
    from paradapt.twin.profile import profile

    model = tiny_model("llama")
    cost = profile(
        model,
        ranks=(4, 8),
        scenarios=3,
        copies=1,
        move_repeats=1,
        workload_rates=(20.0,),
        workload_seconds=0.5,
        log=lambda s: None,
    )
    assert cost.fit["steps"] > 10 and cost.fit["held_out"]["n"] > 0 and "mape" in cost.fit["train"]
    assert cost.fit["mixture_steps"] > 0  # learned mixtures ran in the probe steps
    assert cost.fingerprint["model_config"] and cost.fingerprint["cores"] and cost.fingerprint["torch"]
    assert cost.fingerprint["quantization"] == "none"
    assert sum(cost.step.values()) > 0 and all(v >= 0 for v in cost.step.values())
    assert cost.moves["load_host"][0] + cost.moves["load_host"][1] > 0
    assert cost.adapter_bytes("lora", 8) > cost.adapter_bytes("lora", 4) > 0
    assert cost.kv_bytes_per_token == 2 * 2 * 2 * 8 * 4  # K and V, 2 layers, 2 kv heads of 8, float32
    back = CostModel.load(cost.save(tmp_path / "c.json"))
    assert back.to_dict() == cost.to_dict()
    assert pa_bare(model)


def test_profile_runs_the_engine_on_an_int4_base_and_says_so(tmp_path):
    import paradapt as pa
    from paradapt.twin.profile import profile

    model = pa.quantize(tiny_model("llama"), "int4")
    cost = profile(
        model, ranks=(4,), scenarios=2, copies=1, move_repeats=1, workload_rates=(20.0,),
        workload_seconds=0.3, log=lambda s: None,
    )
    assert cost.fingerprint["quantization"] == "int4-g32" and cost.fit["steps"] > 5
    assert sum(cost.step.values()) > 0


def pa_bare(model) -> bool:
    import paradapt as pa

    return not pa.list_adapters(model)


def test_model_fingerprint_of_a_folder_matches_the_loaded_models(tmp_path):
    from paradapt.twin.costmodel import model_fingerprint, model_fingerprint_of_folder
    from paradapt.twin.profile import build_model

    model = build_model(layers=1, hidden=64)
    model.save_pretrained(tmp_path / "m")
    assert (
        model_fingerprint_of_folder(tmp_path / "m")["model_config"]
        == model_fingerprint(model.config.to_dict())["model_config"]
    )
    other = build_model(layers=2, hidden=64)
    assert (
        model_fingerprint(other.config.to_dict())["model_config"]
        != model_fingerprint(model.config.to_dict())["model_config"]
    )


def test_cli_profile_bad_model_is_one_line(tmp_path, capsys):
    assert cli.main(["profile", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope" in err


def test_profile_prices_every_kind_the_engine_serves():
    """Prefix tuning, MAM, (IA)^3 and SSF profile like the default three: the twin then prices a
    workload of them (the shipped cost model, which has none, says which flag measures them)."""
    from paradapt.twin.profile import profile

    kinds = ("prefix", "mam", "ia3", "ssf")
    cost = profile(tiny_model("llama"), kinds=kinds, ranks=(4, 8), scenarios=3, copies=1, move_repeats=1,
                   workload_rates=(20.0,), workload_seconds=0.5, mixtures=False, log=lambda s: None)
    assert all(cost.adapter_bytes(k, 4) > 0 for k in kinds) and {f"adapters_{k}" for k in kinds} <= set(cost.step)
    spec = WorkloadSpec(num_adapters=8, rate=20.0, duration=1.0, input_len=(4, 16), output_len=(2, 8),
                        ranks=[4, 8], kinds=list(kinds))
    assert simulate(spec, cost, max_served=8, max_slots=4, drain=5.0).finished > 0
    with pytest.raises(ConfigError, match="paradapt profile --kinds lora,parallel,series,(prefix|mam|ia3|ssf) measures it"):
        simulate(spec, CostModel.from_coefficients({"step": 1e-3}), max_served=8, max_slots=4)


def test_cli_twin_without_cost_uses_the_shipped_cost_model(capsys):
    from paradapt.twin.costmodel import DEFAULT_COST

    shipped = CostModel.load(DEFAULT_COST)
    assert shipped.fingerprint["model"] == "random-llama-h512-l8" and shipped.fit["steps"] > 100
    assert cli.main(["twin", str(EXAMPLES / "workload.yaml"), "--max-served", "16", "--max-slots", "4"]) == 0
    assert "throughput" in capsys.readouterr().out


def test_the_chat_example_finds_its_shared_prompt_starts_cached(tmp_path, capsys):
    chat = str(EXAMPLES / "workload_chat.yaml")
    out = tmp_path / "twin.json"
    assert cli.main(["twin", chat, "--max-served", "32", "--max-slots", "8", "--json", str(out)]) == 0
    assert "prefix cache" in capsys.readouterr().out
    assert json.loads(out.read_text())["extra"]["cached_input_tokens"] > 0


@pytest.mark.parametrize("num_blocks", [40, 400])
def test_twin_prefix_cache_takes_the_real_engines_hits_step_by_step(tmp_path, num_blocks, monkeypatch):
    """A workload whose prompts share their adapter's first 9 tokens (two pages of 4): the twin's
    prefix cache finds the same tokens cached as the real engine's, so every chunk starts where
    the real one does, with KV room to spare (400 pages) and with cached pages evicted (40)."""
    from paradapt.serve.hf_paged import PagedKV

    evicted, evict = [], PagedKV._evict
    monkeypatch.setattr(PagedKV, "_evict", lambda self, pages: evicted.append(evict(self, pages)) or evicted[-1])
    spec = replace(SPEC, shared_prefix=9)
    knobs = {**KNOBS, "num_blocks": num_blocks}
    workload, engine, clock = real_engine_on_modelled_time(tmp_path, spec, COST, **knobs)
    real = replay(workload, ModelledTimeBackend(engine, clock, vocab=96), drain=5.0)
    twin_engine = SimEngine(workload, COST, EngineConfig(max_served=3, max_slots=2, **knobs))
    twin = replay(workload, SimBackend(twin_engine), drain=5.0)

    assert engine.prefix_stats["hits"] > 0  # the real engine did share pages
    assert twin_engine.prefix.hits == engine.prefix_stats["hits"]
    assert twin_engine.prefix.queries == engine.prefix_stats["queries"]
    assert twin.steps == real.steps
    assert summarize(twin).row() == summarize(real).row()
    assert (sum(evicted) > 0, twin_engine.prefix.evicted > 0) == ((num_blocks == 40),) * 2  # pages went
    off = SimEngine(workload, COST, EngineConfig(max_served=3, max_slots=2, **knobs, prefix_caching=False))
    assert replay(workload, SimBackend(off), drain=5.0).steps != twin.steps  # the cache changed the steps

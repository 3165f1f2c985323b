"""Workload generator: S-LoRA's power-law popularity, Gamma arrivals, seeded, validated spec."""

from __future__ import annotations

import statistics

import pytest

from paradapt.errors import ConfigError
from paradapt.serve.workload import WorkloadSpec, adapter_probabilities, generate, shared_prefix_ids


def spec(**kw) -> WorkloadSpec:
    base = dict(num_adapters=20, rate=10.0, duration=100.0, seed=3)
    base.update(kw)
    return WorkloadSpec(**base)


def test_same_seed_same_workload_other_seed_differs():
    a, b = spec().generate(), spec().generate()
    assert a.requests == b.requests and a.adapters == b.adapters
    c = spec(seed=4).generate()
    assert c.requests != a.requests


def test_longer_duration_extends_without_changing_the_prefix():
    short, long = spec(duration=50.0).generate(), spec(duration=100.0).generate()
    assert long.requests[: len(short.requests)] == short.requests
    assert len(long.requests) > len(short.requests)


def test_arrivals_are_sorted_inside_the_window_with_ids_in_order():
    w = spec().generate()
    times = [r.arrival for r in w.requests]
    assert times == sorted(times) and 0 < times[0] and times[-1] <= 100.0
    assert [r.id for r in w.requests] == list(range(len(w.requests)))


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_empirical_rate_and_cv_match_the_spec(cv):
    w = spec(rate=20.0, duration=2000.0, cv=cv, seed=11).generate()
    gaps = [w.requests[0].arrival] + [
        b.arrival - a.arrival for a, b in zip(w.requests[:-1], w.requests[1:], strict=True)
    ]
    mean = statistics.fmean(gaps)
    assert 1 / mean == pytest.approx(20.0, rel=0.05)
    assert statistics.pstdev(gaps) / mean == pytest.approx(cv, rel=0.08)


def test_shared_prefix_is_each_requests_up_to_its_prompt_and_the_same_ids_per_adapter():
    w = spec(shared_prefix=20, input_len=(8, 40), seed=5).generate()
    assert [r.shared_prefix for r in w.requests] == [min(20, r.prompt_len) for r in w.requests]
    a = shared_prefix_ids("adapter-0001", 20, 0, range(3, 100))
    assert a == shared_prefix_ids("adapter-0001", 20, 0, range(3, 100)) and len(a) == 20
    assert a != shared_prefix_ids("adapter-0002", 20, 0, range(3, 100))  # another adapter, other ids
    assert shared_prefix_ids(None, 0, 0, range(3, 100)) == []
    # the spec without shared_prefix draws the same requests as before the field existed
    plain = spec(seed=5).generate().requests
    assert [(r.arrival, r.prompt_len) for r in plain] == [
        (r.arrival, r.prompt_len) for r in spec(shared_prefix=3, seed=5).generate().requests
    ]


def test_max_requests_caps_the_count():
    assert len(spec(max_requests=7).generate().requests) == 7


def test_lengths_are_uniform_over_the_inclusive_ranges():
    w = spec(input_len=[3, 6], output_len=(10, 10), duration=300.0).generate()
    prompts = [r.prompt_len for r in w.requests]
    assert set(prompts) == {3, 4, 5, 6}
    assert {r.output_len for r in w.requests} == {10}
    for v in (3, 4, 5, 6):  # ~750 draws each
        assert prompts.count(v) / len(prompts) == pytest.approx(0.25, abs=0.04)


def test_probabilities_follow_the_power_law_and_sum_to_one():
    p = adapter_probabilities(10, 0.5)
    assert sum(p) == pytest.approx(1.0)
    assert p[0] == pytest.approx(0.1**0.5)
    assert p == sorted(p, reverse=True)
    assert adapter_probabilities(4, 1.0) == pytest.approx([0.25] * 4)


def test_top_adapter_share_grows_as_alpha_falls():
    shares = []
    for alpha in (1.0, 0.6, 0.3, 0.1):
        w = spec(num_adapters=50, alpha=alpha, rate=50.0, duration=200.0).generate()
        counts = w.requests_per_adapter()
        top = counts[w.spec.adapter_names()[0]]
        share = top / len(w.requests)
        assert share == pytest.approx(adapter_probabilities(50, alpha)[0], abs=0.02)
        shares.append(share)
    assert shares == sorted(shares)
    assert shares[-1] > 10 * shares[0]


def test_adapter_rates_sum_to_the_rate_and_match_the_counts():
    s = spec(num_adapters=8, alpha=0.3, rate=40.0, duration=500.0)
    rates = s.adapter_rates()
    assert sum(rates.values()) == pytest.approx(40.0)
    counts = s.generate().requests_per_adapter()
    for name, r in rates.items():
        assert counts[name] / 500.0 == pytest.approx(r, rel=0.1, abs=0.1)


def test_uniform_alpha_reaches_every_adapter():
    w = spec(num_adapters=30, alpha=1.0, rate=50.0, duration=100.0).generate()
    counts = list(w.requests_per_adapter().values())
    assert min(counts) > 0.5 * statistics.fmean(counts)


def test_rank_and_kind_mixes_are_realised_exactly_and_seeded():
    s = spec(num_adapters=10, ranks={8: 1, 16: 1, 32: 2}, kinds=["lora", "parallel"])
    w = s.generate()
    ranks = [a.rank for a in w.adapters]
    assert sorted(ranks) == [8] * 3 + [16] * 2 + [32] * 5  # 2.5/2.5/5: the tie goes to the first listed
    assert ranks != sorted(ranks)  # shuffled, not handed out in blocks
    assert [a.kind for a in w.adapters].count("lora") == 5
    assert len({a.name for a in w.adapters}) == 10
    assert (
        spec(num_adapters=10, ranks={8: 1, 16: 1, 32: 2}, kinds=["lora", "parallel"]).generate().adapters
        == w.adapters
    )


def test_offered_tokens_counts_inputs_and_outputs():
    w = spec().generate()
    assert w.offered_tokens() == sum(r.prompt_len + r.output_len for r in w.requests)


def test_yaml_round_trip(tmp_path):
    s = spec(alpha=0.1, cv=2.0, ranks={8: 1, 16: 1}, kinds={"parallel": 1.0}, input_len=(4, 64))
    import yaml

    p = tmp_path / "w.yaml"
    p.write_text(yaml.safe_dump(s.to_dict()))
    loaded = WorkloadSpec.from_yaml(p)
    assert loaded == s
    assert loaded.generate().requests == s.generate().requests


@pytest.mark.parametrize("missing", ["num_adapters", "rate", "duration"])
def test_missing_field_is_named(tmp_path, missing):
    d = {"num_adapters": 4, "rate": 1.0, "duration": 10.0}
    del d[missing]
    p = tmp_path / "w.yaml"
    import yaml

    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=missing) as e:
        WorkloadSpec.from_yaml(p)
    assert e.value.field == missing
    assert str(p) in str(e.value)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("rate", -1.0, "positive"),
        ("rate", 0, "positive"),
        ("duration", float("inf"), "positive"),
        ("alpha", 0.0, "positive"),
        ("cv", "high", "positive"),
        ("num_adapters", 0, ">= 1"),
        ("num_adapters", 2.5, "integer"),
        ("input_len", [64, 8], "impossible length range"),
        ("output_len", [0, 8], "impossible length range"),
        ("input_len", [8], "pair"),
        ("input_len", [8.5, 9], "integers"),
        ("ranks", {8: 0}, "positive"),
        ("ranks", {0: 1}, ">= 1"),
        ("ranks", {}, "empty"),
        ("kinds", ["lora", "adalora"], "unknown adapter kind"),
        ("max_requests", 0, ">= 1"),
        ("shared_prefix", -1, ">= 0"),
        ("shared_prefix", 1.5, "integer"),
    ],
)
def test_bad_values_name_their_field(field, value, match):
    with pytest.raises(ConfigError, match=match) as e:
        spec(**{field: value})
    assert e.value.field == field


def test_unknown_field_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'alpha'") as e:
        WorkloadSpec.from_dict({"num_adapters": 2, "rate": 1.0, "duration": 1.0, "alpah": 0.5})
    assert e.value.field == "alpah"


def test_bad_value_from_a_file_names_field_and_file(tmp_path):
    p = tmp_path / "w.yaml"
    p.write_text("num_adapters: 4\nrate: -2\nduration: 10\n")
    with pytest.raises(ConfigError, match=r"rate: .*positive.*w\.yaml") as e:
        WorkloadSpec.from_yaml(p)
    assert e.value.field == "rate"


def test_unreadable_or_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        WorkloadSpec.from_yaml(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("rate: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        WorkloadSpec.from_yaml(p)
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        WorkloadSpec.from_yaml(p)


def test_specs_are_hashable_and_equal_specs_hash_alike():
    a, b = spec(ranks={8: 1, 16: 2}), spec(ranks={16: 2, 8: 1})
    assert a == b and hash(a) == hash(b) and len({a, b, spec(seed=9)}) == 2


def test_generate_function_equals_method():
    s = spec()
    assert generate(s) == s.generate()

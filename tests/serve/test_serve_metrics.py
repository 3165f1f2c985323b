"""Issue 15: /metrics through prometheus-client, with vLLM's LoRA residency metric.

``paradapt:lora_requests_info`` carries vLLM's ``vllm:lora_requests_info`` labels, so routers
built for vLLM read which adapters run and wait; ``paradapt_adapters{tier}`` counts each cache
tier; the exposition parses as Prometheus text. Runs on the real stories260K Llama.
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve_api_audit import stories, tok  # noqa: F401  (fixtures)

import paradapt as pa
from paradapt.serve.engine import Engine, EngineConfig
from paradapt.serve.metrics import ServerMetrics, prometheus_text
from paradapt.serve.sampling import SamplingParams


@pytest.fixture
def two_adapters(tmp_path):
    model = stories()
    for name in ("lo", "lo2"):
        pa.add_adapter(model, name, pa.LoRAConfig(r=4, init="random"))
        pa.save_adapter(model, name, tmp_path / name)
    return tmp_path


def test_lora_requests_info_names_running_and_waiting_adapters(two_adapters, tok):  # noqa: F811
    config = EngineConfig(page_size=16, num_blocks=64, token_budget=64, max_running=1, max_slots=2)
    engine = Engine(stories(), two_adapters, config, tokenizer=tok)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    engine.add_request([1, 5, 6], "lo", params)
    engine.add_request([1, 7, 8], "lo2", params)
    engine.add_request([1, 9], None, params)
    engine.step()  # admits "lo" only (max_running=1)
    families = {f.name: f for f in text_string_to_metric_families(prometheus_text(engine, ServerMetrics()))}
    (info,) = families["paradapt:lora_requests_info"].samples
    assert info.labels == {"max_lora": "2", "running_lora_adapters": "lo", "waiting_lora_adapters": "lo2"}
    assert info.value > 1e9  # the time of the scrape, as vLLM sets it
    tiers = {s.labels["tier"]: s.value for s in families["paradapt_adapters"].samples}
    assert tiers == {"disk": 2, "host": 2, "device": 1}  # "lo2" prefetched into host memory
    assert families["paradapt_running_requests"].samples[0].value == 1
    assert families["paradapt_queue_length"].samples[0].value == 2
    engine.run()
    text = prometheus_text(engine, ServerMetrics())
    assert 'running_lora_adapters="",waiting_lora_adapters=""' in text

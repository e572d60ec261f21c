"""Activation quantization (issue 11, first slice): W8A8-int8 quality and CPU prefill speed.

Quality: held-out KL to the fp32 model, perplexity and top-1 agreement on the demo model for W8A8-int8 with
RTN weights and with GPTQ weights (the ``w8a8-int8`` preset), beside W8A16 (the same int8 per-channel GPTQ
weights, float activations) so the cost of quantizing activations shows on its own. Each run goes through
``compress.run`` in its own process (load, calibrate, sweep, export, eval of the export).

Speed: prefill of batch x seq >= 2048 tokens, median of a few forwards, fp32 dense vs the W8A8 export with
``kernel="int8"`` (``torch._int_mm``) and ``kernel="reference"`` (dequantize, fp32 matmul): on the demo model
(hidden 128, where per-token quantization overhead dominates) and on single Linear layers of LLM widths.

Run: python benchmarks/activations.py [--num-samples 64] → benchmarks/results/activations.json|md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_time, spawn_recipe, write_results  # noqa: E402

RUNS = [
    ("W8A16 GPTQ", {"method": "gptq", "bits": 8, "group_size": -1, "observer": "minmax"}),
    ("W8A8-int8 RTN", {"method": "rtn", "bits": 8, "group_size": -1, "activations": "int8-dynamic"}),
    ("W8A8-int8 GPTQ", {"method": "gptq", "bits": 8, "group_size": -1, "observer": "minmax",
                        "activations": "int8-dynamic"}),
]
PREFILL = (8, 256)  # batch x seq = 2048 tokens
LAYERS = [(512, 512), (1024, 1024)]  # (in, out); torch's CPU _int_mm is slow, larger ones take minutes


def model_prefill(folder: Path, demo: str) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    import compress

    ids = torch.randint(0, 100, PREFILL, generator=torch.Generator().manual_seed(0))
    models = {"fp32": AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32),
              "int8": compress.load(folder, device="cpu", kernel="int8"),
              "reference": compress.load(folder, device="cpu", kernel="reference"),
              "auto": compress.load(folder, device="cpu", kernel="auto")}
    out = {}
    for name, model in models.items():
        model.eval()
        with torch.inference_mode():
            t, _ = median_time(lambda m=model: m(ids), repeats=3)
        out[name] = ids.numel() / t
    return out


def layer_prefill() -> list[dict]:
    import torch
    from torch import nn

    from compress.codecs import quantize_linear
    from compress.core.scheme import QuantScheme
    from compress.kernels.int8_act import INT8

    rows = []
    for in_f, out_f in LAYERS:
        torch.manual_seed(0)
        linear = nn.Linear(in_f, out_f)
        layer = quantize_linear(linear, QuantScheme.w8a8_int8(), format="int-quantized")
        INT8.prepare(layer)
        layer.kernel = INT8
        x = torch.randn(PREFILL[0] * PREFILL[1], in_f)
        with torch.inference_mode():
            dense_s, _ = median_time(lambda f=linear, x=x: f(x), repeats=3)
            int8_s, _ = median_time(lambda f=layer, x=x: f(x), repeats=3)
        rows.append({"in": in_f, "out": out_f, "tokens": x.shape[0], "fp32_tok_s": x.shape[0] / dense_s,
                     "int8_tok_s": x.shape[0] / int8_s, "speedup": dense_s / int8_s})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-samples", type=int, default=64)
    args = parser.parse_args()
    from compress.models.load import DEMO_MODEL_DIR

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, stage in RUNS:
            recipe = {"model": str(DEMO_MODEL_DIR),
                      "calibration": {"dataset": "demo-calib", "num_samples": args.num_samples},
                      "eval": {"dataset": "demo-heldout"}, "stages": [{**stage, "ignore": ["lm_head"]}]}
            out = Path(tmp) / label.replace(" ", "_")
            m = spawn_recipe(recipe, out)["metrics"]
            rows.append({"scheme": label, "ppl_fp32": m["baseline_ppl"], "ppl": m["ppl"],
                         "ppl_increase": m["ppl_increase"], "kl": m["kl"], "top1": m["top1"]})
            print(json.dumps(rows[-1]), flush=True)
        prefill = model_prefill(Path(tmp) / "W8A8-int8_GPTQ", str(DEMO_MODEL_DIR))
    layers = layer_prefill()

    lines = ["# W8A8-int8 (int8 per-channel weights, int8 per-token dynamic activations)", "",
             f"Demo model; calibration demo-calib, {args.num_samples} samples; eval demo-heldout (KL, ppl and "
             "top-1 against the fp32 model, the same windows for every row). W8A16 GPTQ: the same int8 weights "
             "with float activations.", "",
             "| scheme | ppl fp32 | ppl | increase | KL | top-1 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['ppl_fp32']:.3f} | {r['ppl']:.3f} | {r['ppl_increase'] * 100:+.2f}% | "
                     f"{r['kl']:.5f} | {r['top1'] * 100:.1f}% |")
    tokens = PREFILL[0] * PREFILL[1]
    lines += ["", f"## CPU prefill, {PREFILL[0]} x {PREFILL[1]} = {tokens} tokens (median of 3)", "",
              "Demo model (hidden 128), tokens/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in prefill.items())
              + f" (int8 / fp32 = {prefill['int8'] / prefill['fp32']:.2f}x).", "",
              "Single Linear layers (per-token quantization of the input included):", "",
              "| in | out | fp32 tok/s | int8 tok/s | int8 / fp32 |", "|---|---|---|---|---|"]
    for r in layers:
        lines.append(f"| {r['in']} | {r['out']} | {r['fp32_tok_s']:,.0f} | {r['int8_tok_s']:,.0f} | "
                     f"{r['speedup']:.2f}x |")
    write_results("activations", {"rows": rows, "num_samples": args.num_samples, "prefill_tok_s": prefill,
                                  "prefill_shape": list(PREFILL), "layers": layers}, "\n".join(lines))


if __name__ == "__main__":
    main()

"""Activation quantization (issue 11, first slice): W8A8-int8 quality and CPU prefill speed.

Quality: held-out KL to the fp32 model, perplexity and top-1 agreement on the demo model for W8A8-int8 with
RTN weights and with GPTQ weights (the ``w8a8-int8`` preset), beside W8A16 (the same int8 per-channel GPTQ
weights, float activations) so the cost of quantizing activations shows on its own. Each run goes through
``compress.run`` in its own process (load, calibrate, sweep, export, eval of the export).

Speed: prefill of batch x seq >= 2048 tokens, median of a few forwards, fp32 dense vs the W8A8 export with
``kernel="int8"`` (``torch._int_mm``) and ``kernel="reference"`` (dequantize, fp32 matmul): on the demo model
(hidden 128, where per-token quantization overhead dominates) and on single Linear layers of LLM widths.

SmoothQuant (``--part smoothquant``): W8A8-int8 with GPTQ weights, without and with SmoothQuant (alpha 0.5 and
alpha auto), beside W8A16, on three models: the demo model, qwen2-256 (``benchmarks/models/qwen2-256``, trained
with ``scripts/train_demo_model.py``; skipped with a line when absent) and a copy of the demo model with
synthetic activation outliers: in every block, channels 3, 17 and 40 of both norms' weights times 30 and the
matching input columns of their readers divided by 30. That copy computes exactly what the demo model computes
(same fp32 reference), but its q/k/v and gate/up inputs carry 30x outlier channels, which is where LLMs
beyond ~6B put theirs (the reason SmoothQuant exists). Our small trained models have few outliers: the
natural rows show what smoothing does when there is little to migrate.

FP8 (``--part fp8``): e4m3 beside int8 on the same three models: W8A16 int8 and FP8 weight-only (RTN, per
channel), W8A8-int8 (RTN and GPTQ weights), W8A8-FP8 with per-token dynamic and per-tensor static inputs, and
LLM.int8() (the same int8 RTN weights, outlier input dimensions in float at run time).
The "FP8 versus INT8" claim (FP8 activations beat int8 on outlier-heavy activations) is what the outlier copy
tests: a 30x channel costs per-token int8 resolution across the whole token, e4m3's exponent keeps the rest.

KV cache (``--part kv``): FP8 KV-cache scales per layer and per head, alone (fp32 weights) and after W4A16 GPTQ
and W8A8-FP8, on the same models.

W4A8 (``--part w4a8``): W4A16 GPTQ, W4A8 GPTQ and W4A8 GPTQ with rank 8 and 16 low-rank compensation.

Run: python benchmarks/activations.py [--num-samples 64] [--part all|quality|smoothquant|fp8|kv|w4a8]
     → benchmarks/results/activations.json|md (``--part smoothquant`` → activations_smoothquant.json|md,
     ``--part fp8`` → activations_fp8.json|md, ``--part kv`` → activations_kv_cache.json|md, ``--part w4a8`` → activations_w4a8.json|md)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_time, spawn_recipe, write_results  # noqa: E402

RUNS = [
    ("W8A16 GPTQ", {"method": "gptq", "bits": 8, "group_size": -1, "observer": "minmax"}),
    ("W8A8-int8 RTN", {"method": "rtn", "bits": 8, "group_size": -1, "activations": "int8-dynamic"}),
    ("W8A8-int8 GPTQ", {"method": "gptq", "bits": 8, "group_size": -1, "observer": "minmax",
                        "activations": "int8-dynamic"}),
]
SMOOTH_RUNS = [
    ("W8A16 GPTQ", [{"method": "gptq", "bits": 8, "group_size": -1, "observer": "minmax"}]),
    ("W8A8-int8 GPTQ", [RUNS[2][1]]),
    ("SmoothQuant 0.5 + W8A8-int8 GPTQ", [{"method": "smoothquant", "alpha": 0.5}, RUNS[2][1]]),
    ("SmoothQuant auto + W8A8-int8 GPTQ", [{"method": "smoothquant", "alpha": "auto"}, RUNS[2][1]]),
    ("SmoothQuant 0.5 + W8A8-int8 RTN", [{"method": "smoothquant", "alpha": 0.5}, RUNS[1][1]]),
]
FP8_WEIGHTS = {"method": "rtn", "type": "float", "bits": 8, "group_size": -1, "observer": "minmax"}
FP8_RUNS = [
    ("W8A16 int8 RTN", [{"method": "rtn", "bits": 8, "group_size": -1, "observer": "minmax"}]),
    ("W8A16-FP8 RTN", [FP8_WEIGHTS]),
    ("W8A8-int8 RTN", [RUNS[1][1]]),
    ("W8A8-int8 GPTQ", [RUNS[2][1]]),
    ("W8A8-FP8 dynamic", [{**FP8_WEIGHTS, "activations": "fp8-dynamic"}]),
    ("W8A8-FP8 static", [{**FP8_WEIGHTS, "activations": "fp8-static"}]),
    ("LLM.int8() RTN (threshold 6)", [{"method": "rtn", "bits": 8, "group_size": -1, "observer": "minmax",
                                       "activations": "llm-int8", "threshold": 6.0}]),
]
W4_GPTQ = {"method": "gptq", "bits": 4, "group_size": 128}
KV_RUNS = [
    ("fp32 weights + KV fp8", [{"method": "kv_cache"}]),
    ("fp32 weights + KV fp8 per head", [{"method": "kv_cache", "strategy": "head"}]),
    ("W4A16 GPTQ", [W4_GPTQ]),
    ("W4A16 GPTQ + KV fp8", [W4_GPTQ, {"method": "kv_cache"}]),
    ("W8A8-FP8 dynamic + KV fp8", [{**FP8_WEIGHTS, "activations": "fp8-dynamic"}, {"method": "kv_cache"}]),
]
W4A8_GPTQ = {**W4_GPTQ, "activations": "int8-dynamic"}
W4A8_RUNS = [
    ("W4A16 GPTQ", [W4_GPTQ]),
    ("W4A8 GPTQ", [W4A8_GPTQ]),
    ("W4A8 GPTQ + LoRC rank 8", [{"method": "lowrank", "rank": 8, "quantizer": W4A8_GPTQ}]),
    ("W4A8 GPTQ + LoRC rank 16", [{"method": "lowrank", "rank": 16, "quantizer": W4A8_GPTQ}]),
]
OUTLIER_CHANNELS, OUTLIER_FACTOR = (3, 17, 40), 30.0
SECOND = Path(__file__).resolve().parent / "models" / "qwen2-256"
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


def save_outlier_copy(source: str, out: Path) -> Path:
    """The demo model with function-preserving synthetic outliers (see the module docstring), as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    idx = torch.tensor(OUTLIER_CHANNELS)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, owner, readers in ((layer.input_layernorm, layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                                         (layer.post_attention_layernorm, layer.mlp, ("gate_proj", "up_proj"))):
                norm.weight[idx] *= OUTLIER_FACTOR
                for name in readers:
                    getattr(owner, name).weight[:, idx] /= OUTLIER_FACTOR
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def benchmark_models(tmp: Path) -> list[tuple[str, str]]:
    """(label, folder) of the models a part runs on: demo, qwen2-256 when trained, the synthetic-outlier copy."""
    from compress.models.load import DEMO_MODEL_DIR

    models = [("demo", str(DEMO_MODEL_DIR))]
    if SECOND.exists():
        models.append(("qwen2-256", str(SECOND)))
    else:
        print(f"{SECOND} is absent (train it with scripts/train_demo_model.py): its rows are skipped")
    models.append(("demo + synthetic outliers", str(save_outlier_copy(str(DEMO_MODEL_DIR), tmp / "outliers"))))
    return models


def quality_rows(runs: list[tuple[str, list[dict]]], num_samples: int) -> list[dict]:
    """Every run on every benchmark model, each in its own process (``compress.run``: load, calibrate, sweep,
    export, eval of the export); KL, ppl and top-1 against the model's own fp32 self."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_label, model in benchmark_models(Path(tmp)):
            for label, stages in runs:
                recipe = {"model": model, "calibration": {"dataset": "demo-calib", "num_samples": num_samples},
                          "eval": {"dataset": "demo-heldout"},
                          "stages": [s if s["method"] in ("smoothquant", "kv_cache") else {**s, "ignore": ["lm_head"]}
                                     for s in stages]}
                out = Path(tmp) / f"{model_label}-{label}".replace(" ", "_")
                m = spawn_recipe(recipe, out)["metrics"]
                rows.append({"model": model_label, "scheme": label, "ppl_fp32": m["baseline_ppl"], "ppl": m["ppl"],
                             "kl": m["kl"], "top1": m["top1"]})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def ratio_table(rows: list[dict], reference: str, ratio_name: str) -> list[str]:
    """Markdown rows with each row's KL over the ``reference`` scheme's KL on the same model."""
    plain = {r["model"]: r["kl"] for r in rows if r["scheme"] == reference}
    lines = [f"| model | scheme | ppl (fp32) | KL | {ratio_name} | top-1 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['scheme']} | {r['ppl']:.3f} ({r['ppl_fp32']:.3f}) | {r['kl']:.5f} | "
                     f"{r['kl'] / plain[r['model']]:.2f} | {r['top1'] * 100:.1f}% |")
    return lines


def ratio_part(name: str, runs: list[tuple[str, list[dict]]], num_samples: int, title: str, about: str,
               reference: str, ratio_name: str, extra: Callable[[list[dict]], list[str]] | None = None) -> None:
    """One results file: every run on every model, the KL table with ratios to ``reference``, ``extra`` lines."""
    rows = quality_rows(runs, num_samples)
    lines = [f"# {title}", "", about, "", *ratio_table(rows, reference, ratio_name), *(extra(rows) if extra else [])]
    write_results(name, {"rows": rows, "num_samples": num_samples, "outlier_channels": list(OUTLIER_CHANNELS),
                         "outlier_factor": OUTLIER_FACTOR}, "\n".join(lines))


def smoothquant_part(num_samples: int) -> None:
    ratio_part(
        "activations_smoothquant", SMOOTH_RUNS, num_samples,
        "SmoothQuant before W8A8-int8 (int8 per-channel weights, int8 per-token dynamic activations)",
        f"Calibration demo-calib, {num_samples} samples of 256 tokens; eval demo-heldout (KL, ppl and top-1 "
        "against each model's fp32 self, the same windows for every row). `KL / W8A8`: over the W8A8-int8 "
        "GPTQ row of the same model. The synthetic-outlier copy computes what the demo model computes, "
        f"with channels {list(OUTLIER_CHANNELS)} of every norm x{OUTLIER_FACTOR:g} (readers' columns "
        "divided): see benchmarks/activations.py.",
        "W8A8-int8 GPTQ", "KL / W8A8")


def fp8_part(num_samples: int) -> None:
    ratio_part(
        "activations_fp8", FP8_RUNS, num_samples,
        "FP8 (e4m3) beside int8: weight-only and W8A8, dynamic and static inputs; LLM.int8()",
        f"Calibration demo-calib, {num_samples} samples of 256 tokens (read by GPTQ and by the static input "
        "scales; RTN weight-only reads none); eval demo-heldout (KL, ppl and top-1 against each model's fp32 "
        "self, the same windows for every row). `KL / int8`: over the W8A8-int8 RTN row of the same model "
        "(the same round-to-nearest weights, int8 codes instead of e4m3). All weights per output channel, "
        "symmetric, min/max scales. FP8 runs here as fake quantization (e4m3 codes dequantized, fp32 matmul: "
        "the reader's arithmetic on a CPU), so this table is about quality, not speed. The synthetic-outlier "
        f"copy: channels {list(OUTLIER_CHANNELS)} of every norm x{OUTLIER_FACTOR:g}, readers' columns divided "
        "(same function as demo).",
        "W8A8-int8 RTN", "KL / int8")


def kv_increases(rows: list[dict]) -> list[str]:
    """Per model: the ppl the FP8 cache adds alone (per layer, per head) and on top of W4A16 GPTQ."""
    by = {(r["model"], r["scheme"]): r for r in rows}

    def increase(model: str, scheme: str, over: str | None = None) -> str:
        row = by[(model, scheme)]
        base = by[(model, over)]["ppl"] if over else row["ppl_fp32"]
        return f"{(row['ppl'] / base - 1) * 100:+.2f}%"

    lines = ["", "| model | KV fp8 alone: ppl + | per head: ppl + | W4A16 GPTQ + KV fp8 over W4A16: ppl + |",
             "|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines.append(f"| {model} | {increase(model, 'fp32 weights + KV fp8')} | "
                     f"{increase(model, 'fp32 weights + KV fp8 per head')} | "
                     f"{increase(model, 'W4A16 GPTQ + KV fp8', 'W4A16 GPTQ')} |")
    return lines


def kv_part(num_samples: int) -> None:
    ratio_part(
        "activations_kv_cache", KV_RUNS, num_samples,
        "FP8 (e4m3) KV cache: static calibrated scales for keys (after RoPE) and values",
        f"Calibration demo-calib, {num_samples} samples of 256 tokens; eval demo-heldout (KL, ppl and top-1 "
        "against each model's fp32 self, the same windows). Rows without weight quantization isolate the "
        "cache's own cost; `ppl +` is over the fp32 model's ppl. The scales are calibrated on the model as "
        "the stages before left it (the kv_cache stage comes last). The released transformers 5.24 + "
        "compressed-tensors 0.20 skip `kv_cache_scheme` (see kernels/kv_cache.py): these numbers are what "
        "`compress.load` and vLLM's fp8 KV cache compute.",
        "W4A16 GPTQ", "KL / W4A16", kv_increases)


def w4a8_part(num_samples: int) -> None:
    ratio_part(
        "activations_w4a8", W4A8_RUNS, num_samples,
        "W4A8 (int4 weights g128, int8 per-token inputs) with and without low-rank compensation",
        f"Calibration demo-calib, {num_samples} samples of 256 tokens; eval demo-heldout (KL, ppl and top-1 "
        "against each model's fp32 self, the same windows). GPTQ with its defaults (act-order, observer "
        "auto). LoRC here is our low-rank compensation (`--lorc-rank R` = `--lowrank-compensate R`): rank-R "
        "factors of each layer's quantization error in the activation-weighted norm (EoRA), not LoRC's plain "
        "SVD. `KL / W4A8`: over the W4A8 GPTQ row of the same model.",
        "W4A8 GPTQ", "KL / W4A8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--part", choices=["all", "quality", "smoothquant", "fp8", "kv", "w4a8"], default="all")
    args = parser.parse_args()
    if args.part in ("all", "smoothquant"):
        smoothquant_part(args.num_samples)
    if args.part in ("all", "fp8"):
        fp8_part(args.num_samples)
    if args.part in ("all", "kv"):
        kv_part(args.num_samples)
    if args.part in ("all", "w4a8"):
        w4a8_part(args.num_samples)
    if args.part in ("smoothquant", "fp8", "kv", "w4a8"):
        return
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

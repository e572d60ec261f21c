"""RTN vs GPTQ quality on trained reference models: held-out perplexity, KL and top-1 vs fp32, the wall
time of the quantization step, peak resident memory, and per-layer reconstruction error.

Each quantization runs in its own process (so its peak RSS is its own) through the same `compress.run`
path the CLI uses, on the same calibration samples and the same held-out windows.

Run: python benchmarks/quality.py [--models demo path/to/other] → benchmarks/results/quality.json|md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import spawn_recipe, write_results  # noqa: E402

SETTINGS = [("W4g128", 4, 128), ("W3g128", 3, 128), ("W2g64", 2, 64), ("W4 per-channel", 4, -1)]
METHODS = [("RTN", {"method": "rtn"}), ("RTN mse", {"method": "rtn", "observer": "mse"}),
           ("GPTQ minmax", {"method": "gptq", "observer": "minmax"}),
           ("GPTQ", {"method": "gptq"}),  # the default: MSE clipping search
           ("GPTQ act-order", {"method": "gptq", "act_order": True})]


def layer_errors(model_path: str, outputs: dict[str, Path], num_samples: int) -> dict[str, dict[str, float]]:
    """‖(W − Ŵ)X‖ / ‖WX‖ per layer on calibration inputs of the fp32 model, for each exported variant."""
    import torch

    import compress
    from compress.calibrate.data import calibration_samples
    from compress.calibrate.stats import HessianStats
    from compress.kernels.quant_linear import QuantLinear
    from compress.models.blocks import select_layers
    from compress.models.load import load_model

    loaded = load_model(model_path)
    model = loaded.model
    names = select_layers(model)
    seq_len = min(2048, model.config.max_position_embeddings)
    ids = calibration_samples(loaded.tokenizer, "demo-calib", num_samples, seq_len, seed=0).input_ids
    stats = {n: HessianStats(model.get_submodule(n).in_features) for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, s=stats[n]: s.add_batch(a[0]))
             for n in names]
    with torch.inference_mode():
        for row in ids:
            model(input_ids=row[None])
    for h in hooks:
        h.remove()
    errors: dict[str, dict[str, float]] = {}
    for label, out in outputs.items():
        quant = compress.load(out)
        for name in names:
            w = model.get_submodule(name).weight.double()
            module = quant.get_submodule(name)
            assert isinstance(module, QuantLinear)
            delta = module.dequantized_weight(torch.float64) - w
            h = stats[name].hessian.double()
            num = torch.einsum("oi,ij,oj->", delta, h, delta).clamp_min(0).sqrt()
            den = torch.einsum("oi,ij,oj->", w, h, w).sqrt()
            errors.setdefault(name, {})[label] = (num / den).item()
    return errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["demo"])
    parser.add_argument("--num-samples", type=int, default=128)
    args = parser.parse_args()
    from compress.models.load import DEMO_MODEL_DIR

    rows, per_layer = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            path = str(DEMO_MODEL_DIR) if model == "demo" else model
            name = Path(path).name
            w4_outputs = {}
            for label, bits, group in SETTINGS:
                for method_label, fields in METHODS:
                    recipe = {"model": path, "calibration": {"dataset": "demo-calib", "num_samples": args.num_samples},
                              "eval": {"dataset": "demo-heldout"},
                              "stages": [{"bits": bits, "group_size": group, **fields}]}
                    out = Path(tmp) / f"{name}-{label}-{method_label}".replace(" ", "_")
                    got = spawn_recipe(recipe, out)
                    m = got["metrics"]
                    rows.append({"model": name, "setting": label, "method": method_label, "ppl_fp32": m["baseline_ppl"],
                                 "ppl": m["ppl"], "ppl_increase": m["ppl_increase"], "kl": m["kl"], "top1": m["top1"],
                                 "quantize_s": got["timings"]["compress_s"] + got["timings"]["calibration_s"],
                                 "peak_rss_mb": got["peak_rss_mb"], "size_after_bytes": got["size_after_bytes"],
                                 "eval_tokens": m["tokens"]})
                    print(json.dumps(rows[-1]), flush=True)
                    if label == "W4g128" or label == "W3g128":
                        w4_outputs[f"{label} {method_label}"] = out
            per_layer[name] = layer_errors(path, w4_outputs, min(args.num_samples, 32))

    lines = ["# RTN vs GPTQ (held-out ppl, KL and top-1 vs the fp32 model)", "",
             f"Calibration: demo-calib, {args.num_samples} samples x the model's context (256 tokens). "
             "Eval: demo-heldout, non-overlapping 256-token windows, the same for every row.", "",
             "| model | setting | method | ppl fp32 | ppl | increase | KL | top-1 | quantize s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['setting']} | {r['method']} | {r['ppl_fp32']:.3f} | {r['ppl']:.3f} | "
                     f"{r['ppl_increase'] * 100:+.2f}% | {r['kl']:.4f} | {r['top1'] * 100:.1f}% | "
                     f"{r['quantize_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "## Per-layer reconstruction error ‖(W−Ŵ)X‖/‖WX‖ on fp32 calibration inputs", ""]
    for model, layers in per_layer.items():
        labels = sorted({k for v in layers.values() for k in v})
        lines += [f"### {model}", "", "| layer | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for layer, values in layers.items():
            lines.append(f"| {layer} | " + " | ".join(f"{values[k]:.4f}" for k in labels) + " |")
        for setting in ("W4g128", "W3g128"):
            wins = sum(values[f"{setting} GPTQ"] < values[f"{setting} RTN"] for values in layers.values())
            lines.append(f"\n{setting}: GPTQ below RTN on {wins} of {len(layers)} layers.")
        lines.append("")
    floors = quality_floors(rows, per_layer)
    lines += ["## Floors (issue 3)", ""] + [f"- {k}: {'met' if v else 'NOT met'}" for k, v in floors.items()]
    write_results("quality", {"rows": rows, "per_layer": per_layer, "num_samples": args.num_samples,
                              "floors": floors}, "\n".join(lines))


def quality_floors(rows: list[dict], per_layer: dict) -> dict[str, bool]:
    """The issue's floors, computed from the rows rather than read off by eye."""
    def ppl(model: str, setting: str, method: str) -> float:
        return next(r["ppl"] for r in rows if (r["model"], r["setting"], r["method"]) == (model, setting, method))

    floors: dict[str, bool] = {}
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in models:
        fp32 = next(r["ppl_fp32"] for r in rows if r["model"] == model)
        floors[f"{model}: GPTQ below RTN in ppl at every setting"] = all(
            ppl(model, s, "GPTQ") < ppl(model, s, "RTN") for s, _, _ in SETTINGS)
        floors[f"{model}: same observer, GPTQ below RTN in ppl at every setting (minmax and mse)"] = all(
            ppl(model, s, "GPTQ minmax") < ppl(model, s, "RTN") and ppl(model, s, "GPTQ") < ppl(model, s, "RTN mse")
            for s, _, _ in SETTINGS)
        floors[f"{model}: GPTQ below RTN in reconstruction error on every layer (W4g128, W3g128)"] = all(
            v[f"{s} GPTQ"] < v[f"{s} RTN"] for v in per_layer[model].values() for s in ("W4g128", "W3g128"))
        floors[f"{model}: W4g128 GPTQ within 2% of fp32"] = ppl(model, "W4g128", "GPTQ") <= 1.02 * fp32
        rtn3, gptq3 = ppl(model, "W3g128", "RTN"), ppl(model, "W3g128", "GPTQ")
        floors[f"{model}: W3g128 GPTQ recovers at least half of RTN's increase"] = gptq3 - fp32 <= 0.5 * (rtn3 - fp32)
    return floors


if __name__ == "__main__":
    main()

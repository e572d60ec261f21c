"""Beyond GPTQ (issue 12): RTN, GPTQ, AWQ and AWQ+GPTQ side by side on trained reference models.

Held-out KL to the fp32 model, perplexity and top-1 agreement, the wall time of calibration + compression,
and peak resident memory, at W4g128, W4 per-channel, W3g128 and W2g64. Each quantization runs in its own
process through ``compress.run`` (the CLI's path: load, calibrate, sweep, export, eval of the export), on
the same calibration samples and the same held-out windows. Every method uses its preset's defaults
(GPTQ: MSE clipping search; AWQ: grid of 20 alphas, clipping search, 4096 sampled rows per group; AWQ+GPTQ:
AWQ folding only, then the same GPTQ); nothing is tuned per model.

Run: python benchmarks/beyond_gptq.py [--models demo benchmarks/models/qwen2-256] [--num-samples 128]
→ benchmarks/results/beyond_gptq.json|md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import spawn_recipe, write_results  # noqa: E402

SETTINGS = [("W4g128", 4, 128), ("W4 per-channel", 4, -1), ("W3g128", 3, 128), ("W2g64", 2, 64)]
METHODS: list[tuple[str, list[dict]]] = [
    ("RTN", [{"method": "rtn"}]),
    ("GPTQ", [{"method": "gptq"}]),
    ("AWQ", [{"method": "awq"}]),
    ("AWQ+GPTQ", [{"method": "awq", "quantize": False}, {"method": "gptq"}]),
]
SECOND = Path(__file__).resolve().parent / "models" / "qwen2-256"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["demo", *([str(SECOND)] if SECOND.is_dir() else [])])
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--settings", nargs="+", default=[label for label, _, _ in SETTINGS])
    args = parser.parse_args()
    from compress.models.load import DEMO_MODEL_DIR

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            path = str(DEMO_MODEL_DIR) if model == "demo" else model
            name = "demo" if model == "demo" else Path(path).name
            for label, bits, group in SETTINGS:
                if label not in args.settings:
                    continue
                for method_label, stages in METHODS:
                    scheme = {"bits": bits, "group_size": group}
                    recipe = {"model": path, "calibration": {"dataset": "demo-calib", "num_samples": args.num_samples},
                              "eval": {"dataset": "demo-heldout"},
                              "stages": [{**stage, **scheme} for stage in stages]}
                    out = Path(tmp) / f"{name}-{label}-{method_label}".replace(" ", "_").replace("+", "_")
                    got = spawn_recipe(recipe, out)
                    m = got["metrics"]
                    rows.append({"model": name, "setting": label, "method": method_label,
                                 "ppl_fp32": m["baseline_ppl"], "ppl": m["ppl"], "ppl_increase": m["ppl_increase"],
                                 "kl": m["kl"], "top1": m["top1"],
                                 "quantize_s": got["timings"]["compress_s"] + got["timings"]["calibration_s"],
                                 "wall_s": got["wall_s"], "peak_rss_mb": got["peak_rss_mb"],
                                 "eval_tokens": m["tokens"]})
                    print(json.dumps(rows[-1]), flush=True)

    def kl(model: str, setting: str, method: str) -> float:
        return next(r["kl"] for r in rows if (r["model"], r["setting"], r["method"]) == (model, setting, method))

    lines = ["# Beyond GPTQ: RTN, GPTQ, AWQ, AWQ+GPTQ (held-out KL, ppl and top-1 vs the fp32 model)", "",
             f"Calibration: demo-calib, {args.num_samples} samples x the model's context (256 tokens). "
             "Eval: demo-heldout, non-overlapping 256-token windows, the same for every row. `quantize s` is "
             "calibration + compression; `wall s` the whole run (load, sweep, export, eval of the export). "
             "KL ratio: this row's KL over GPTQ's at the same setting.", "",
             "| model | setting | method | ppl fp32 | ppl | increase | KL | KL / GPTQ | top-1 | quantize s | wall s "
             "| peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["kl"] / kl(r["model"], r["setting"], "GPTQ")
        lines.append(f"| {r['model']} | {r['setting']} | {r['method']} | {r['ppl_fp32']:.3f} | {r['ppl']:.3f} | "
                     f"{r['ppl_increase'] * 100:+.2f}% | {r['kl']:.4f} | {ratio:.2f} | {r['top1'] * 100:.1f}% | "
                     f"{r['quantize_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    write_results("beyond_gptq", {"rows": rows, "num_samples": args.num_samples}, "\n".join(lines))


if __name__ == "__main__":
    main()

"""RTN on the embedded demo model: perplexity, KL and top-1 vs fp32, size on disk, and the wall time of
`compress quantize --bits 4` (the README's main job).

Run: python benchmarks/spine.py  → benchmarks/results/spine.json and spine.md
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_time, write_results  # noqa: E402

SCHEMES = [("W8g128", 8, 128), ("W4g128", 4, 128), ("W3g128", 3, 128), ("W4 per-channel", 4, -1)]


def quantized_bytes(folder: Path) -> dict[str, int]:
    from compress.evaluate.size import safetensors_header_meta, weights_bytes_by_component

    return weights_bytes_by_component(safetensors_header_meta(folder))


def main() -> None:
    import compress
    from compress.models.load import DEMO_MODEL_DIR
    from compress.recipes.loader import recipe_from_dict

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, bits, group in SCHEMES:
            recipe = recipe_from_dict({"stages": [{"method": "rtn", "bits": bits, "group_size": group}]})
            out = Path(tmp) / label.replace(" ", "-")
            result = compress.run(recipe, out)
            m = result.metrics
            parts = quantized_bytes(out)
            rows.append({"scheme": label, "ppl_fp32": m["baseline_ppl"], "ppl": m["ppl"],
                         "ppl_increase": m["ppl_increase"], "kl": m["kl"], "top1": m["top1"],
                         "size_before_bytes": result.size_before_bytes, "size_after_bytes": result.size_after_bytes,
                         "bytes_by_component": parts, "eval_tokens": m["tokens"]})

        def cli_run() -> None:
            out = Path(tmp) / f"cli-{time.perf_counter_ns()}"
            subprocess.run(["compress", "quantize", "--bits", "4", "--output", str(out), "--json"], check=True,
                           capture_output=True)

        wall, times = median_time(cli_run, repeats=3, warmup=1)

    # the quantized layers' fp32 weights vs their packed codes + scales (bits/16 of fp16 is the expectation)
    from safetensors import safe_open

    dense_linear_bytes = 0
    with safe_open(str(Path(DEMO_MODEL_DIR) / "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118
            if ".layers." in name and name.endswith("proj.weight"):
                shape = handle.get_slice(name).get_shape()
                dense_linear_bytes += shape[0] * shape[1] * 2  # as fp16
    lines = ["# RTN on the demo model (held-out perplexity, KL and top-1 vs the fp32 model)", "",
             "| scheme | ppl fp32 | ppl | increase | KL nats/token | top-1 | size before | size after | "
             "quantized layers / their fp16 size |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        quant = r["bytes_by_component"]["quantized weights"] + r["bytes_by_component"]["scales/zeros"]
        r["quantized_over_fp16"] = quant / dense_linear_bytes
        lines.append(f"| {r['scheme']} | {r['ppl_fp32']:.3f} | {r['ppl']:.3f} | {r['ppl_increase'] * 100:+.2f}% | "
                     f"{r['kl']:.5f} | {r['top1'] * 100:.2f}% | {r['size_before_bytes'] / 1e6:.2f} MB | "
                     f"{r['size_after_bytes'] / 1e6:.2f} MB | {r['quantized_over_fp16']:.3f} |")
    lines += ["", f"`compress quantize --bits 4` (the default: GPTQ W4g128, MSE scales, 128 x 256 calibration tokens) "
              f"wall time, median of 3 after a warm-up, includes load, calibration and eval: "
              f"{wall:.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)})",
              f"Eval: {rows[0]['eval_tokens']:,} held-out tokens (demo-heldout), non-overlapping windows.",
              "Scales are stored in the model dtype (fp32 here), so 'quantized layers / fp16 size' is "
              "bits/16 plus 32 bits per group."]
    write_results("spine", {"rows": rows, "cli_wall_s": wall, "cli_runs_s": times}, "\n".join(lines))
    json.dumps(rows)


if __name__ == "__main__":
    main()

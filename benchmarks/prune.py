"""Unstructured and N:M pruning on trained reference models: held-out perplexity, KL and top-1 vs the dense
model, size on disk (whole checkpoint and the pruned layers alone), and CPU decode tokens/s.

Every variant runs through the same `compress.run` path the CLI uses, on the same calibration samples and
the same held-out windows. Decode speed is timed with `compress.evaluate.speed.measure` (the `compress
bench` code), dense and pruned interleaved, median of the rounds; unstructured zeros inside dense matrices
are not expected to speed anything up on the CPU (no sparse kernel is used), and the table says so.

Run: python benchmarks/prune.py [--models demo benchmarks/models/qwen2-192] → benchmarks/results/prune.json|md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

VARIANTS = [
    ("50% unstructured", "magnitude", [{"method": "magnitude", "sparsity": 0.5}]),
    ("50% unstructured", "wanda", [{"method": "wanda", "sparsity": 0.5}]),
    ("50% unstructured", "sparsegpt", [{"method": "sparsegpt", "sparsity": 0.5}]),
    ("2:4", "magnitude", [{"method": "magnitude", "pattern": "2:4"}]),
    ("2:4", "wanda", [{"method": "wanda", "pattern": "2:4"}]),
    ("2:4", "sparsegpt", [{"method": "sparsegpt", "pattern": "2:4"}]),
    ("2:4 + W4g128", "sparsegpt joint", [{"method": "sparsegpt", "pattern": "2:4", "bits": 4, "group_size": 128}]),
    ("2:4 + W4g128", "sparsegpt then gptq (2of4-w4a16)", "2of4-w4a16"),
]


def pruned_layer_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of the sparse-bitmask tensors, bytes the same layers take dense) in a checkpoint folder."""
    from safetensors import safe_open

    sparse = dense = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                if key.endswith((".compressed", ".bitmask", ".row_offsets", ".shape")):
                    t = handle.get_tensor(key)
                    sparse += t.numel() * t.element_size()
                    if key.endswith(".compressed"):
                        rows, cols = handle.get_tensor(key[: -len("compressed")] + "shape").tolist()
                        dense += rows * cols * t.element_size()
    return sparse, dense


def decode_speed(paths: dict[str, str], rounds: int) -> dict[str, float]:
    from compress.evaluate.speed import measure

    runs: dict[str, list[float]] = {label: [] for label in paths}
    for _ in range(rounds):
        for label, path in paths.items():  # interleaved: A B C A B C ...
            result = measure(path, prompt_len=64, new_tokens=32, kernel="auto", repeats=1)
            runs[label].append(result.decode_tokens_per_s)
    return {label: statistics.median(values) for label, values in runs.items()}


def size_check(tmp: str) -> dict:
    """50% magnitude pruning of a built Llama whose embeddings are a realistic share of the weights (7.5%,
    as in 7B-class models' 2-4%), to show what the whole checkpoint shrinks to, bitmask overhead included."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import compress
    from compress.models.load import DEMO_MODEL_DIR, load_tokenizer
    from compress.recipes.loader import recipe_from_dict

    torch.manual_seed(0)
    folder = Path(tmp) / "built-llama"
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=2048, max_position_embeddings=256, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    load_tokenizer(str(DEMO_MODEL_DIR)).save_pretrained(folder)
    recipe = recipe_from_dict({"model": str(folder), "eval": {"enabled": False},
                               "stages": [{"method": "magnitude", "sparsity": 0.5}]})
    result = compress.run(recipe, Path(tmp) / "built-llama-sp50")
    sparse_b, dense_b = pruned_layer_bytes(Path(result.output))
    return {"parameters": result.parameters, "size_before_bytes": result.size_before_bytes,
            "size_after_bytes": result.size_after_bytes, "pruned_layers_sparse_bytes": sparse_b,
            "pruned_layers_dense_bytes": dense_b}


def main() -> None:
    import compress
    from compress.models.load import DEMO_MODEL_DIR
    from compress.recipes.loader import load_recipe_data, recipe_from_dict

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["demo"])
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--speed-rounds", type=int, default=3)
    parser.add_argument("--suffix", action="store_true", help="write results/prune-<models>.json|md")
    parser.add_argument("--size-only", action="store_true", help="only the checkpoint-size check (prune-size)")
    args = parser.parse_args()
    if args.size_only:
        with tempfile.TemporaryDirectory() as tmp:
            got = size_check(tmp)
        text = ["# 50% unstructured: checkpoint size on a model with a realistic embedding share", "",
                f"Random-weight Llama, hidden 1024, 4 layers, vocab 2048: {got['parameters']:,} parameters, "
                "fp32, magnitude pruning (size does not depend on the method).", "",
                f"- whole checkpoint: {got['size_after_bytes'] / 1e6:.1f} MB of {got['size_before_bytes'] / 1e6:.1f} MB "
                f"= **{got['size_after_bytes'] / got['size_before_bytes']:.3f}** of dense",
                f"- pruned layers alone: {got['pruned_layers_sparse_bytes'] / got['pruned_layers_dense_bytes']:.3f} "
                "of dense (values + bitmask + row offsets)"]
        write_results("prune-size", got, "\n".join(text))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            path = str(DEMO_MODEL_DIR) if model == "demo" else model
            name = Path(path).name
            outputs = {"dense": path}
            for setting, method, stages in VARIANTS:
                stages = load_recipe_data(stages)["stages"] if isinstance(stages, str) else stages
                recipe = recipe_from_dict({"model": path, "eval": {"dataset": "demo-heldout"},
                                           "calibration": {"dataset": "demo-calib", "num_samples": args.num_samples},
                                           "stages": stages})
                out = Path(tmp) / f"{name}-{setting}-{method}".replace(" ", "_").replace(":", "of")
                result = compress.run(recipe, out)
                m = result.metrics
                sparse_b, dense_b = pruned_layer_bytes(out)
                row = {"model": name, "setting": setting, "method": method, "ppl_dense": m["baseline_ppl"],
                       "ppl": m["ppl"], "ppl_increase": m["ppl_increase"], "kl": m["kl"], "top1": m["top1"],
                       "size_before_bytes": result.size_before_bytes, "size_after_bytes": result.size_after_bytes,
                       "pruned_layers_sparse_bytes": sparse_b, "pruned_layers_dense_bytes": dense_b,
                       "compress_s": result.timings["compress_s"], "eval_tokens": m["tokens"]}
                rows.append(row)
                outputs[f"{setting} {method}"] = str(out)
                print(row, flush=True)
            speeds = decode_speed(outputs, args.speed_rounds)
            for row in rows:
                if row["model"] == name:
                    row["decode_tok_s"] = speeds[f"{row['setting']} {row['method']}"]
                    row["dense_decode_tok_s"] = speeds["dense"]

    lines = ["# Pruning (held-out ppl, KL and top-1 vs the dense model; size; CPU decode)", "",
             f"Calibration: demo-calib, {args.num_samples} samples x 256 tokens. Eval: demo-heldout, the same "
             "non-overlapping 256-token windows for every row. Decode: batch 1, 64-token prompt, 32 new tokens, "
             f"median of {args.speed_rounds} interleaved rounds.", "",
             "| model | setting | method | ppl dense | ppl | increase | KL | top-1 | checkpoint / dense | "
             "pruned layers / dense | decode tok/s (dense) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        layers = (f"{r['pruned_layers_sparse_bytes'] / r['pruned_layers_dense_bytes']:.3f}"
                  if r["pruned_layers_dense_bytes"] else "packed 4-bit")
        lines.append(f"| {r['model']} | {r['setting']} | {r['method']} | {r['ppl_dense']:.3f} | {r['ppl']:.3f} | "
                     f"{r['ppl_increase'] * 100:+.2f}% | {r['kl']:.4f} | {r['top1'] * 100:.1f}% | "
                     f"{r['size_after_bytes'] / r['size_before_bytes']:.3f} | {layers} | "
                     f"{r['decode_tok_s']:.0f} ({r['dense_decode_tok_s']:.0f}) |")
    lines += ["", "'pruned layers / dense': the sparse-bitmask tensors (values, bitmask, row offsets, shape) over the "
              "same layers stored dense. The whole checkpoint also holds the dense embeddings and lm_head, "
              "which on these small-vocabulary models are a large share of the bytes.",
              "Unstructured and 2:4 zeros run through dense matmuls on the CPU: no decode speedup is claimed for "
              "them (structured pruning, benchmarks/structured.md, is what makes the model faster)."]
    write_results(f"prune-{'-'.join(Path(m).name for m in args.models)}" if args.suffix else "prune",
                  {"rows": rows, "num_samples": args.num_samples}, "\n".join(lines))


if __name__ == "__main__":
    main()

"""Structured pruning figures: quality on trained models, size and CPU speed on a model big enough to time.

Quality: held-out perplexity (demo-heldout) of 25% MLP channels, 25% heads (rounded to the nearest
GQA-consistent cut: on 4 heads / 2 KV groups that is one query head per group, i.e. 50%) and 1 or 2 dropped
blocks, against the dense model, each through the same ``compress.run`` the CLI uses (calibration demo-calib).
Speed: a random-weight Llama (hidden 1024, intermediate 2816, 8 layers, 16 heads / 4 KV) built with
transformers, pruned the same way; every model is loaded once, then prefill (one forward of 128 tokens) and
greedy decode with the KV cache are timed in many short interleaved rounds (median and best-of-rounds;
one thread by default, the figure least disturbed on a shared machine). The parameter count each artifact
claims in report.json is checked against the checkpoint transformers loads and the count its shape implies.

Run: python benchmarks/structured.py [--rounds 9] [--threads 1] [--only quality|speed] [--models demo ...]
→ benchmarks/results/structured.json|md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results  # noqa: E402

VARIANTS = [
    ("channels 25%", {"target": "channels", "ratio": 0.25}),
    ("heads 25%", {"target": "heads", "ratio": 0.25}),
    ("1 block dropped", {"target": "blocks", "num_blocks": 1}),
    ("2 blocks dropped", {"target": "blocks", "num_blocks": 2}),
    ("channels 25%, no refit", {"target": "channels", "ratio": 0.25, "refit": False}),
    ("heads 25%, no refit", {"target": "heads", "ratio": 0.25, "refit": False}),
]
PROMPT, NEW_TOKENS = 128, 16
SPEED_SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
               "num_key_value_heads": 4, "vocab_size": 2048, "max_position_embeddings": 512}


def prune(model: str | None, stage: dict, out: Path, *, evaluate: bool, calibration: dict | None = None) -> dict:
    import compress
    from compress.recipes.loader import recipe_from_dict

    recipe = recipe_from_dict({"model": model, "stages": [{"method": "structured", **stage}],
                               "calibration": calibration or {}, "eval": {"enabled": evaluate}})
    compress.run(recipe, out, overwrite=True)
    return json.loads((out / "report.json").read_text())


def loaded_parameters(path: Path) -> int:
    from transformers import AutoModelForCausalLM

    from compress.evaluate.size import parameter_count

    return parameter_count(AutoModelForCausalLM.from_pretrained(path))


def shape_of(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    return {k: config.get(k) for k in ("num_hidden_layers", "intermediate_size", "num_attention_heads",
                                       "num_key_value_heads")}


def llama_parameters(shape: dict, hidden: int, vocab: int, head_dim: int) -> int:
    """What a Llama of this shape holds (untied embeddings, no biases): the count pruning claims to reach."""
    attention = hidden * head_dim * 2 * (shape["num_attention_heads"] + shape["num_key_value_heads"])
    block = attention + 3 * hidden * shape["intermediate_size"] + 2 * hidden
    return shape["num_hidden_layers"] * block + 2 * vocab * hidden + hidden


def quality(model: str, work: Path) -> list[dict]:
    from compress.evaluate.size import dir_size_bytes
    from compress.models.load import resolve_model_source

    source = Path(resolve_model_source(None if model == "demo" else model))
    rows = []
    for label, stage in VARIANTS:
        out = work / f"{source.name}-{label.replace(' ', '_').replace('%', '')}"
        try:
            report = prune(None if model == "demo" else model, stage, out, evaluate=True)
        except Exception as error:  # e.g. 2 blocks of a model too shallow: say so in the table
            rows.append({"variant": label, "error": str(error)})
            continue
        ev = report["eval"]
        rows.append({"variant": label, "ppl": ev["ppl"], "baseline_ppl": ev["baseline_ppl"], "kl": ev["kl"],
                     "top1": ev["top1"], "parameters": report["parameters"],
                     "parameters_after": report["parameters_after"],
                     "loaded_parameters": loaded_parameters(out), "size_bytes": dir_size_bytes(out),
                     "baseline_size_bytes": dir_size_bytes(source), "shape": shape_of(out),
                     "detail": {k: v for k, v in report["structured"][0].items() if k not in ("blocks",)}})
    rows += uncalibrated_rows(source, work, {r["variant"]: r for r in rows})
    return rows


def uncalibrated_rows(source: Path, work: Path, calibrated: dict[str, dict]) -> list[dict]:
    """The same shapes chosen without data (weight magnitude; the last blocks), evaluated the same way."""
    from _structured_baselines import uncalibrated

    from compress.evaluate.size import dir_size_bytes, parameter_count
    from compress.models.load import load_model
    from compress.pipeline.evaluation import evaluate
    from compress.recipes.schema import EvalConfig

    heads = calibrated.get("heads 25%", {}).get("shape")
    jobs = [("channels 25%, weight magnitude", "channels", {"ratio": 0.25}),
            ("1 block dropped, the last", "blocks", {"num_blocks": 1}),
            ("2 blocks dropped, the last two", "blocks", {"num_blocks": 2})]
    if heads:
        config = load_model(str(source)).model.config
        per_group = (config.num_attention_heads - heads["num_attention_heads"]) // config.num_key_value_heads
        jobs.insert(1, ("heads 25%, weight magnitude", "heads", {"per_group": per_group}))
    rows = []
    for label, target, options in jobs:
        out = uncalibrated(str(source), target, work / label.replace(" ", "_").replace(",", ""), **options)
        ev = evaluate(str(out), baseline=str(source), config=EvalConfig())
        parameters = parameter_count(load_model(str(out)).model)
        rows.append({"variant": label, "ppl": ev["ppl"], "baseline_ppl": ev["baseline_ppl"], "kl": ev["kl"],
                     "top1": ev["top1"], "parameters": parameter_count(load_model(str(source)).model),
                     "parameters_after": parameters, "loaded_parameters": parameters,
                     "size_bytes": dir_size_bytes(out), "baseline_size_bytes": dir_size_bytes(source),
                     "shape": shape_of(out), "uncalibrated": True})
    return rows


def build_speed_model(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.models.load import DEMO_MODEL_DIR, load_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(**SPEED_SHAPE, tie_word_embeddings=False, head_dim=64)
    config.architectures = ["LlamaForCausalLM"]
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    load_tokenizer(str(DEMO_MODEL_DIR)).save_pretrained(folder)  # vocab 2048: the demo corpus calibrates it
    return folder


def _prefill_s(model, ids) -> float:
    start = time.perf_counter()
    model(ids)
    return time.perf_counter() - start


def _decode_s(model, ids, steps: int) -> float:
    """Seconds per token of greedy decoding with the KV cache, after the prompt's prefill."""
    out = model(ids, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps


def speed(work: Path, rounds: int, threads: int) -> dict:
    """Every model loaded once, then many short interleaved trials: on a shared machine the load drifts, and
    interleaving makes the drift hit every model alike (reloading per trial, as ``measure`` does, would
    double the time spent and the exposure to it)."""
    import torch

    from compress.evaluate.size import dir_size_bytes
    from compress.models.load import load_model

    dense = build_speed_model(work / "llama-1024")
    calibration = {"num_samples": 16, "seq_len": 128}
    paths = {"dense": dense}
    claims = {"dense": {"parameters_after": loaded_parameters(dense)}}
    for label, stage in [VARIANTS[0], VARIANTS[1], VARIANTS[3]]:
        out = work / f"llama-1024-{label.replace(' ', '_').replace('%', '')}"
        claims[label] = prune(str(dense), stage, out, evaluate=False, calibration=calibration)
        paths[label] = out
    torch.set_num_threads(threads)
    models = {label: load_model(str(path)).model for label, path in paths.items()}
    ids = torch.randint(0, SPEED_SHAPE["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(0))
    timings: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up: allocator, kernels
            _prefill_s(model, ids)
            _decode_s(model, ids, 2)
        for _ in range(rounds):
            for label, model in models.items():
                timings[label]["prefill"].append(PROMPT / _prefill_s(model, ids))
                timings[label]["decode"].append(1 / _decode_s(model, ids, NEW_TOKENS))
    rows = []
    base = {k: statistics.median(v) for k, v in timings["dense"].items()}
    best_base = {k: max(v) for k, v in timings["dense"].items()}
    for label, path in paths.items():
        shape = shape_of(path)
        t = timings[label]
        prefill, decode = statistics.median(t["prefill"]), statistics.median(t["decode"])
        rows.append({"variant": label, "shape": shape, "claimed_parameters": claims[label]["parameters_after"],
                     "loaded_parameters": loaded_parameters(path),
                     "shape_parameters": llama_parameters(shape, 1024, 2048, 64), "size_bytes": dir_size_bytes(path),
                     "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
                     "prefill_speedup": prefill / base["prefill"], "decode_speedup": decode / base["decode"],
                     "best_prefill_speedup": max(t["prefill"]) / best_base["prefill"],
                     "best_decode_speedup": max(t["decode"]) / best_base["decode"],
                     "prefill_runs": t["prefill"], "decode_runs": t["decode"]})
    return {"model": {**SPEED_SHAPE, "head_dim": 64, "weights": "random (speed only)"}, "rounds": rounds,
            "threads": threads, "prompt_len": PROMPT, "new_tokens": NEW_TOKENS, "rows": rows}


def markdown(quality_rows: dict[str, list[dict]], speed_result: dict) -> str:
    lines = ["# Structured pruning", "",
             "Held-out perplexity (demo-heldout) after structured pruning, calibrated on demo-calib "
             "(128 x 256 tokens); each row is one `compress.run` of `{method: structured, ...}`. The rows marked "
             "*uncalibrated* choose the same shapes without data (weight magnitude; the last blocks), for comparison "
             "(benchmarks/_structured_baselines.py).", ""]
    for model, rows in quality_rows.items():
        lines += [f"## {model}", "", "| variant | shape (layers / intermediate / heads / KV) | ppl | dense ppl | KL | "
                  "top-1 | parameters (claimed = loaded) | size on disk |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['variant']} | refused: {r['error']} | | | | | | |")
                continue
            s = r["shape"]
            ok = "=" if r["parameters_after"] == r["loaded_parameters"] else "!="
            name = f"*uncalibrated*: {r['variant']}" if r.get("uncalibrated") else r["variant"]
            lines.append(
                f"| {name} | {s['num_hidden_layers']} / {s['intermediate_size']} / "
                f"{s['num_attention_heads']} / {s['num_key_value_heads']} | {r['ppl']:.2f} | {r['baseline_ppl']:.2f} "
                f"| {r['kl']:.3f} | {r['top1']:.3f} | {r['parameters_after']:,} {ok} {r['loaded_parameters']:,} "
                f"({r['parameters_after'] / r['parameters']:.1%}) | {r['size_bytes'] / 1e6:.2f} MB "
                f"({r['size_bytes'] / r['baseline_size_bytes']:.1%}) |")
        lines.append("")
    m = speed_result["model"]
    lines += ["## CPU speed", "",
              f"Random-weight Llama (hidden {m['hidden_size']}, intermediate {m['intermediate_size']}, "
              f"{m['num_hidden_layers']} layers, {m['num_attention_heads']} heads / {m['num_key_value_heads']} KV, "
              f"fp32), {speed_result['threads']} thread(s), prompt {speed_result['prompt_len']} tokens, "
              f"{speed_result['new_tokens']} greedy tokens with the KV cache; {speed_result['rounds']} interleaved "
              "rounds, median (and best-of-rounds ratio, the less load-sensitive figure on a shared machine).", "",
              "| variant | shape | parameters: claimed / loaded / from shape | size on disk | prefill tok/s | "
              "decode tok/s | speedup prefill / decode: median (best) |", "|---|---|---|---|---|---|---|"]
    for r in speed_result["rows"]:
        s = r["shape"]
        lines.append(
            f"| {r['variant']} | {s['num_hidden_layers']} / {s['intermediate_size']} / {s['num_attention_heads']} / "
            f"{s['num_key_value_heads']} | {r['claimed_parameters']:,} / {r['loaded_parameters']:,} / "
            f"{r['shape_parameters']:,} | {r['size_bytes'] / 1e6:.1f} MB | {r['prefill_tokens_per_s']:.0f} | "
            f"{r['decode_tokens_per_s']:.1f} | {r['prefill_speedup']:.2f}x ({r['best_prefill_speedup']:.2f}x) / "
            f"{r['decode_speedup']:.2f}x ({r['best_decode_speedup']:.2f}x) |")
    lines += ["", "Heads: 25% of 16 heads would leave 12, which transformers' LlamaConfig refuses (hidden_size must "
              "be a multiple of num_attention_heads), so the nearest loadable GQA cut is taken: 2 query heads from "
              "each of the 4 KV groups (50%). On the demo (4 heads / 2 KV) the only cut is 1 query head per group "
              "(50%). Dropped blocks are scored by 1 - cos(input, output) over the calibration tokens."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo", "benchmarks/models/qwen2-256"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["quality", "speed"], help="rerun one part, keep the other's results")
    args = parser.parse_args()
    previous = RESULTS / "structured.json"
    kept = json.loads(previous.read_text()) if args.only and previous.is_file() else {}
    quality_rows, speed_result = kept.get("quality", {}), kept.get("speed")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only != "speed":  # models not named keep their earlier rows under --only quality
            quality_rows = dict(quality_rows) if args.only else {}
            for model in args.models:
                if model != "demo" and not (Path(model) / "model.safetensors").is_file():
                    print(f"skipping {model}: no model.safetensors", file=sys.stderr)
                    continue
                quality_rows[model] = quality(model, work)
        if args.only != "quality":
            speed_result = speed(work, args.rounds, args.threads)
    write_results("structured", {"quality": quality_rows, "speed": speed_result}, markdown(quality_rows, speed_result))


if __name__ == "__main__":
    main()

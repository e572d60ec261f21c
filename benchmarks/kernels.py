"""Kernel speed: int4/int8 weight-only GEMV and GEMM vs dense torch, and end-to-end decode tokens/s.

Why these figures: batch-1 decode is memory-bound, so a quantized kernel should win by moving fewer
bytes; we quote the achieved fraction of a measured copy bandwidth next to each speedup so a "win"
that is really a slow baseline is visible. Every comparison is measured A B A B ... in one process
and reported as the median (the machine is shared). CPU section always; GPU section (Triton path,
``triton.testing.do_bench``) only when CUDA is present.

    python benchmarks/kernels.py            # CPU micro + end-to-end (several minutes), writes results
    python benchmarks/kernels.py --quick    # fewer repeats, smaller built model (smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_time, write_results  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)
GROUP = 128


def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 7) -> float:
    """Bytes per second of a large ``copy_`` counting read + write traffic (the memory-bound ceiling)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t, _ = median_time(lambda: dst.copy_(src), repeats=repeats, warmup=2)
    return 2 * nbytes / t


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn, timed round-robin (A B C A B C ...) so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _quant_layer(weight: torch.Tensor, bits: int, group: int, kernel: str):
    from compress.core.scheme import QuantScheme
    from compress.kernels.paths import apply_kernel
    from compress.kernels.quant_linear import QuantLinear

    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    lin.weight.data = weight
    layer = QuantLinear.from_linear(lin, QuantScheme(bits, group, True))
    wrapper = nn.ModuleDict({"layer": layer})
    counts = apply_kernel(wrapper, kernel)
    assert counts == {kernel: 1}, counts
    return layer


def weight_bytes(kind: str, out_f: int, in_f: int) -> int:
    """Bytes a GEMV must read for the weight (plus scales) in each representation."""
    if kind == "int4":
        return out_f * in_f // 2 + (in_f // GROUP) * out_f * 2 * 2  # nibbles + bf16 (scale, zero)
    if kind == "int8":
        return out_f * in_f + out_f * 2
    return out_f * in_f * (4 if kind == "fp32" else 2)


def cpu_micro(quick: bool) -> tuple[list[dict[str, Any]], float]:
    bw = copy_bandwidth()
    rows = []
    for out_f, in_f in SHAPES:
        torch.manual_seed(0)
        w = torch.randn(out_f, in_f) * 0.02
        w_bf16 = w.bfloat16()
        w4 = _quant_layer(w, 4, GROUP, "cpu")
        w8 = _quant_layer(w, 8, -1, "cpu")
        for batch in (1, 128):
            x = torch.randn(batch, in_f)
            xb = x.bfloat16()
            fns = {
                "fp32": partial(F.linear, x, w),
                "bf16": partial(F.linear, xb, w_bf16),
                "int4": partial(w4, x),
                "int8": partial(w8, x),
            }
            repeats = (5 if quick else 21) if batch == 1 else (3 if quick else 7)
            t = interleaved(fns, repeats)
            for kind, sec in t.items():
                row = {"shape": f"{out_f}x{in_f}", "batch": batch, "kind": kind, "ms": sec * 1e3,
                       "vs_fp32": t["fp32"] / sec, "vs_bf16": t["bf16"] / sec}
                if batch == 1:
                    row["GBps"] = weight_bytes(kind, out_f, in_f) / sec / 1e9
                    row["bw_fraction"] = weight_bytes(kind, out_f, in_f) / sec / bw
                rows.append(row)
                print(row, flush=True)
    return rows, bw


def _build_llama(folder: Path, quick: bool) -> int:
    """A random-weight Llama (>= 50M parameters unless quick) saved with the demo tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from compress.models.load import DEMO_MODEL_DIR, load_tokenizer

    tok = load_tokenizer(str(DEMO_MODEL_DIR))
    hidden, inter, layers = (512, 1408, 2) if quick else (1024, 2816, 6)
    config = LlamaConfig(vocab_size=max(8192, len(tok)), hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _quantize(model_dir: Path, out: Path, bits: int, group: int) -> None:
    import compress
    from compress.recipes.loader import recipe_from_dict

    recipe = recipe_from_dict({
        "model": str(model_dir), "eval": {"enabled": False},
        "calibration": {"dataset": "demo-calib", "num_samples": 4, "seq_len": 64},
        "stages": [{"method": "rtn", "bits": bits, "group_size": group}],
    })
    compress.run(recipe, out)


def decode_seconds(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds for ``new_tokens`` greedy decode steps with a KV cache, after a (untimed) prefill."""
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        past = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - start


def end_to_end(label: str, model_dir: Path, work: Path, quick: bool) -> dict[str, Any]:
    import compress
    from compress.export.load import load as compress_load
    from compress.models.load import load_model

    w4_dir, w8_dir = work / f"{label}-w4", work / f"{label}-w8"
    _quantize(model_dir, w4_dir, 4, GROUP)
    _quantize(model_dir, w8_dir, 8, -1)
    fp32 = load_model(str(model_dir)).model.float().eval()
    bf16 = load_model(str(model_dir)).model.to(torch.bfloat16).eval()
    models = {"fp32": fp32, "bf16": bf16, "W8": compress.load(w8_dir, device="cpu"),
              "W4": compress.load(w4_dir, device="cpu")}
    kernels = {k: getattr(m, "compress_kernels", None) for k, m in models.items()}
    load_s, _ = median_time(lambda: compress_load(w4_dir, device="cpu"), repeats=3)
    torch.manual_seed(0)
    vocab = fp32.config.vocab_size
    prompt = torch.randint(4, min(vocab, 2048), (1, 32))
    new_tokens = 16 if quick else 64
    rounds = 2 if quick else 7
    secs: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        decode_seconds(m, prompt, 4)  # warm-up
    for _ in range(rounds):
        for k, m in models.items():
            secs[k].append(decode_seconds(m, prompt, new_tokens))
    tps = {k: new_tokens / statistics.median(v) for k, v in secs.items()}
    params = sum(p.numel() for p in fp32.parameters())
    result = {"model": label, "parameters": params, "tokens_per_s": tps, "kernels": kernels,
              "w4_load_s": load_s, "prompt": 32, "new_tokens": new_tokens, "rounds": rounds,
              "w4_vs_fp32": tps["W4"] / tps["fp32"], "w4_vs_bf16": tps["W4"] / tps["bf16"]}
    print(result, flush=True)
    return result


def gpu_section() -> list[dict[str, Any]]:
    """W4 (Triton path) vs fp16 torch at batch 1, 16, 512, timed by triton.testing.do_bench."""
    import triton.testing

    rows = []
    for out_f, in_f in SHAPES:
        torch.manual_seed(0)
        w = (torch.randn(out_f, in_f, device="cuda") * 0.02).half()
        w4 = _quant_layer(w, 4, GROUP, "triton")
        for batch in (1, 16, 512):
            x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
            fp16_ms = triton.testing.do_bench(partial(F.linear, x, w))
            w4_ms = triton.testing.do_bench(partial(w4, x))
            row = {"shape": f"{out_f}x{in_f}", "batch": batch, "fp16_ms": fp16_ms, "w4_ms": w4_ms,
                   "w4_speedup": fp16_ms / w4_ms}
            if batch == 1:
                row["w4_GBps"] = weight_bytes("int4", out_f, in_f) / (w4_ms * 1e-3) / 1e9
            rows.append(row)
            print(row, flush=True)
    return rows


def markdown(micro: list[dict[str, Any]], bw: float, e2e: list[dict[str, Any]]) -> str:
    lines = ["# Kernels (CPU)", "", f"Copy bandwidth (read + write): {bw / 1e9:.1f} GB/s; threads "
             f"{torch.get_num_threads()}; medians, variants interleaved.", "",
             "| out x in | batch | kind | ms | vs fp32 | vs bf16 | GB/s | of copy bw |",
             "|---|---|---|---|---|---|---|---|"]
    for r in micro:
        gb = f"{r['GBps']:.1f}" if "GBps" in r else ""
        frac = f"{r['bw_fraction']:.0%}" if "bw_fraction" in r else ""
        lines.append(f"| {r['shape']} | {r['batch']} | {r['kind']} | {r['ms']:.2f} | {r['vs_fp32']:.2f}x | "
                     f"{r['vs_bf16']:.2f}x | {gb} | {frac} |")
    lines += ["", "## Decode tokens/s (batch 1, prompt 32, greedy, KV cache)", "",
              "| model | params | fp32 | bf16 | W8 | W4 | W4/fp32 | W4/bf16 | W4 load s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in e2e:
        t = r["tokens_per_s"]
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {t['fp32']:.1f} | {t['bf16']:.1f} | "
                     f"{t['W8']:.1f} | {t['W4']:.1f} | {r['w4_vs_fp32']:.2f}x | {r['w4_vs_bf16']:.2f}x | "
                     f"{r['w4_load_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats and a small built model")
    parser.add_argument("--skip-cpu", action="store_true", help="only the GPU section")
    args = parser.parse_args()

    if torch.cuda.is_available():
        rows = gpu_section()
        lines = ["# Kernels (GPU, Triton W4 vs fp16 torch)", "", f"{torch.cuda.get_device_name()}", "",
                 "| out x in | batch | fp16 ms | W4 ms | speedup |", "|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['batch']} | {r['fp16_ms']:.4f} | {r['w4_ms']:.4f} | {r['w4_speedup']:.2f}x |"
                  for r in rows]
        write_results("kernels_gpu", {"gpu": rows}, "\n".join(lines))
    if args.skip_cpu:
        return

    from compress.models.load import DEMO_MODEL_DIR

    micro, bw = cpu_micro(args.quick)
    e2e = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        e2e.append(end_to_end("demo", DEMO_MODEL_DIR, work, args.quick))
        built = work / "built-llama"
        _build_llama(built, args.quick)
        e2e.append(end_to_end("built-llama", built, work, args.quick))
    big = e2e[-1]
    gemv = {r["kind"]: r for r in micro if r["shape"] == "4096x11008" and r["batch"] == 1}
    floors = {
        "w4_decode_ge_2x_fp32": big["w4_vs_fp32"] >= 2.0,
        "w4_decode_faster_than_bf16": big["w4_vs_bf16"] > 1.0,
        "int4_gemv_4096x11008_ge_3x_fp32": gemv["int4"]["vs_fp32"] >= 3.0,
    }
    md = markdown(micro, bw, e2e) + "\n\nFloors (issue 4): " + ", ".join(
        f"{k}: {'met' if v else 'NOT met'}" for k, v in floors.items())
    write_results("kernels" if not args.quick else "kernels_quick",
                  {"copy_bandwidth_Bps": bw, "micro": micro, "end_to_end": e2e, "floors": floors}, md)


if __name__ == "__main__":
    main()

"""Peak memory of `compress quantize` follows the largest block, not the depth.

Two Llama models that differ only in depth (random weights, saved as safetensors) are quantized with
GPTQ W4g128 in separate processes; the peak resident set (ru_maxrss) of each process is recorded, with
blocks streamed from disk (the default) and with the whole model loaded first (stream: false).

Run: python benchmarks/memory.py → benchmarks/results/memory.json|md
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB = 1024, 2816, 2048
DEPTHS = (4, 12)


def build(folder: Path, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.models.load import DEMO_MODEL_DIR, load_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=VOCAB,
                         max_position_embeddings=256, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    load_tokenizer(str(DEMO_MODEL_DIR)).save_pretrained(folder)


def child(spec: str) -> None:
    import compress
    from compress.recipes.loader import recipe_from_dict

    job = json.loads(spec)
    result = compress.run(recipe_from_dict(job["recipe"]), job["out"])
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "compress_s": result.timings["compress_s"], "params": result.parameters}))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        child(sys.argv[2])
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in DEPTHS:
            folder = Path(tmp) / f"llama-{layers}l"
            build(folder, layers)
            for stream in (True, False):
                recipe = {"model": str(folder), "stream": stream, "eval": {"enabled": False},
                          "calibration": {"dataset": "demo-calib", "num_samples": 16, "seq_len": 256},
                          "stages": [{"method": "gptq", "bits": 4, "group_size": 128}]}
                out = Path(tmp) / f"out-{layers}-{stream}"
                job = json.dumps({"recipe": recipe, "out": str(out)})
                done = subprocess.run([sys.executable, __file__, "--one", job], capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(done.stderr[-3000:])
                got = json.loads(done.stdout.strip().splitlines()[-1])
                fp32_mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6
                rows.append({"layers": layers, "stream": stream, "checkpoint_mb": fp32_mb, **got})
                print(rows[-1], flush=True)
    by = {(r["layers"], r["stream"]): r for r in rows}
    lines = ["# Peak memory vs depth (GPTQ W4g128, 16 calibration samples x 256 tokens, eval off)", "",
             f"Llama, hidden {HIDDEN}, intermediate {INTERMEDIATE}, vocab {VOCAB}; only the depth differs.", "",
             "| layers | parameters | checkpoint MB | load | peak RSS MB | quantize s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['params']:,} | {r['checkpoint_mb']:.0f} | "
                     f"{'streamed blocks' if r['stream'] else 'whole model'} | {r['peak_rss_mb']:.0f} | "
                     f"{r['compress_s']:.1f} |")
    deep, shallow = DEPTHS[-1], DEPTHS[0]
    ratio_stream = by[(deep, True)]["peak_rss_mb"] / by[(shallow, True)]["peak_rss_mb"]
    ratio_eager = by[(deep, False)]["peak_rss_mb"] / by[(shallow, False)]["peak_rss_mb"]
    lines += ["", f"Peak RSS {deep} layers / {shallow} layers: streamed {ratio_stream:.3f}, whole model "
              f"{ratio_eager:.3f} (checkpoint size ratio {by[(deep, True)]['checkpoint_mb'] / by[(shallow, True)]['checkpoint_mb']:.2f}).",
              "What still grows with depth when streaming: the packed 4-bit layers already done (about 1/7 of "
              "their fp32 size) and the safetensors writer's copy of them at export."]
    write_results("memory", {"rows": rows, "ratio_streamed": ratio_stream, "ratio_whole_model": ratio_eager},
                  "\n".join(lines))


if __name__ == "__main__":
    main()

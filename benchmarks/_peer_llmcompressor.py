"""Driver for the llm-compressor side of benchmarks/speed_vs_peers.py; runs with the PEER venv's python.

    PEER_PY _peer_llmcompressor.py MODEL_DIR TOKENS.pt OUT_DIR [--threads N] [--actorder static|weight|none]
        [--bits B --group-size G]
    PEER_PY _peer_llmcompressor.py --ppl WINDOWS.pt MODEL_DIR [MODEL_DIR ...]

The second form is a cross-check of our eval: it loads each folder with transformers (a compressed-tensors
checkpoint is decompressed by compressed-tensors itself) and prints the perplexity on the given [W, T] windows,
scored as our eval scores them (next-token NLL over every position of every window, exp of the mean).

TOKENS.pt holds the exact [num_samples, seq_len] calibration ids that compress draws (calibration_samples), so
both tools see the same tokens. GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]) is
llm-compressor's W4 group-128 symmetric GPTQ; its other fields are left at their defaults unless --actorder says
otherwise. Prints one JSON line: the times of load / oneshot() / save, versions and this process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

T0 = time.perf_counter()


def perplexities(windows: str, folders: list[str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.load(windows)
    got = {}
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        nll, count = 0.0, 0
        with torch.inference_mode():
            for row in ids:
                logits = model(input_ids=row[None]).logits[0, :-1].float()
                nll += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
                count += row.numel() - 1
        got[folder] = float(torch.tensor(nll / count).exp())
    print(json.dumps({"ppl": got, "windows": list(ids.shape)}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--ppl":
        perplexities(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("tokens")
    parser.add_argument("out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--actorder", default="default", help="default (llm-compressor's own), static, weight, none")
    parser.add_argument("--bits", type=int, default=4, help="weight bits (4: the W4A16 preset; else a custom scheme)")
    parser.add_argument("--group-size", type=int, default=128, help="group size (-1: per channel)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_import = time.perf_counter() - T0
    ids = torch.load(args.tokens)
    num_samples, seq_len = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t_load = time.perf_counter() - t

    extra = {} if args.actorder == "default" else {"actorder": None if args.actorder == "none" else args.actorder}
    if args.bits == 4 and args.group_size == 128:
        recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], **extra)
    else:  # the W4A16 preset's weights with other bits / groups; every other field at llm-compressor's default
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        strategy = "channel" if args.group_size == -1 else "group"
        weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=True, strategy=strategy,
                                   group_size=None if args.group_size == -1 else args.group_size)
        scheme = QuantizationScheme(targets=["Linear"], weights=weights)
        recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], **extra)
    t = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=recipe, num_calibration_samples=num_samples,
            max_seq_length=seq_len, shuffle_calibration_samples=False)
    t_oneshot = time.perf_counter() - t

    t = time.perf_counter()
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    t_save = time.perf_counter() - t

    print(json.dumps({
        "tool": "llm-compressor", "import_s": t_import, "load_s": t_load, "oneshot_s": t_oneshot, "save_s": t_save,
        "total_s": time.perf_counter() - T0, "threads": torch.get_num_threads(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "recipe": recipe.model_dump(mode="json", exclude_none=True) if hasattr(recipe, "model_dump") else str(recipe),
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__},
        "num_samples": num_samples, "seq_len": seq_len,
    }, default=str))


if __name__ == "__main__":
    main()

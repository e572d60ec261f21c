"""Minimal reproduction, ready for an upstream report: transformers 5.23-5.24 cannot load an asymmetric
compressed-tensors ``pack-quantized`` checkpoint (checkpoints of llm-compressor fail the same way).

    python benchmarks/repro_transformers_asym_zero_point.py

What it does: builds a 2-layer Llama from a config, writes it as W4 asymmetric group-32 ``pack-quantized`` (the
tensors the compressed-tensors package's own ``PackedQuantizationCompressor`` writes and decompresses: a packed
``weight_zero_point`` of shape ``[ceil(out*4/32), groups]`` int32), then calls
``AutoModelForCausalLM.from_pretrained``. On 5.23/5.24 this raises a size-mismatch RuntimeError that suggests
``ignore_mismatched_sizes``: the loader allocates ``weight_zero_point`` at the unpacked shape ``[out, groups]``.
5.22 loads the same folder. Workaround: ``quantization_config=CompressedTensorsConfig(dequantize=True)``.
Prints the versions, the error (first line), and whether the workaround loads it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import compressed_tensors
import torch
import transformers
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig, LlamaForCausalLM

import compress
from compress.recipes.loader import recipe_from_dict


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="asym-repro-"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    source = root / "model"
    LlamaForCausalLM(config).save_pretrained(source)
    demo = Path(compress.__file__).parent / "assets" / "demo"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).write_bytes((demo / name).read_bytes())
    out = root / "w4g32-asym"
    compress.run(recipe_from_dict({"model": str(source), "eval": {"enabled": False},
                                   "stages": [{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}]}),
                 out)
    print(f"transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__}")
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    print("scheme:", json.dumps(weights["weights"]))
    try:
        AutoModelForCausalLM.from_pretrained(str(out))
        print("plain from_pretrained: loads")
    except Exception as error:  # noqa: BLE001 - the point is to show whatever it raises
        print(f"plain from_pretrained: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
    AutoModelForCausalLM.from_pretrained(str(out), quantization_config=CompressedTensorsConfig(dequantize=True))
    print("with CompressedTensorsConfig(dequantize=True): loads")


if __name__ == "__main__":
    main()

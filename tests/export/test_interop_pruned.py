"""Pruned exports as the released readers see them (transformers 5.x + compressed-tensors).

Current compressed-tensors has no sparse decompressor, so a ``sparse-bitmask`` checkpoint loads in
transformers with the pruned layers randomly initialised; vLLM refuses any ``sparsity_config`` with
targets. What we write by default must therefore load in transformers with exactly the pruned weights,
and the opt-in compact layout must be refused by such readers rather than loaded as garbage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import compress
from compress.recipes.loader import recipe_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pruned-interop")
    corpus = root / "calib.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(80)))
    return save_tiny("llama", root / "llama"), corpus


def _run(source: tuple[Path, Path], out: Path, stages: list[dict], **export) -> Path:
    model, corpus = source
    recipe = recipe_from_dict({"model": str(model), "stages": stages, "eval": {"enabled": False},
                               "calibration": {"dataset": str(corpus), "num_samples": 4, "seq_len": 32},
                               "export": export})
    compress.run(recipe, out)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def test_pruned_default_is_a_plain_checkpoint_transformers_loads_exactly(source, tmp_path):
    out = _run(source, tmp_path / "sparse", [{"method": "sparsegpt", "sparsity": 0.5}])
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # nothing a reader could misread
    hf_logging.set_verbosity_error()
    theirs = AutoModelForCausalLM.from_pretrained(str(out))
    ours = compress.load(out, device="cpu", kernel="reference")
    torch.testing.assert_close(_logits(theirs, IDS), _logits(ours, IDS), rtol=1e-5, atol=1e-5)
    down = theirs.model.layers[0].mlp.down_proj.weight
    assert abs(float((down == 0).float().mean()) - 0.5) < 0.02  # the zeros, not random weights


def test_pruned_and_quantized_carries_no_sparsity_config(source, tmp_path):
    out = _run(source, tmp_path / "sparse-w4", [{"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"},
                                                 {"method": "gptq", "bits": 4, "group_size": 32}])
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["format"] == "pack-quantized" and not quant.get("sparsity_config")
    hf_logging.set_verbosity_error()
    theirs = AutoModelForCausalLM.from_pretrained(str(out))
    ours = compress.load(out, device="cpu", kernel="reference")
    torch.testing.assert_close(_logits(theirs, IDS), _logits(ours, IDS), rtol=1e-4, atol=1e-4)
    weight = ours.model.layers[0].mlp.down_proj.dequantized_weight(torch.float32)
    assert bool((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1).le(2).all())  # 2:4 kept through GPTQ


def test_opt_in_bitmask_is_refused_by_transformers_and_read_by_compress(source, tmp_path):
    dense = _run(source, tmp_path / "dense", [{"method": "magnitude", "sparsity": 0.5}])
    packed = _run(source, tmp_path / "bitmask", [{"method": "magnitude", "sparsity": 0.5}], sparse_format="bitmask")
    assert not (packed / "model.safetensors").exists() and (packed / "sparse-bitmask.safetensors").exists()
    size = lambda folder: sum(f.stat().st_size for f in folder.glob("*.safetensors"))  # noqa: E731
    assert size(packed) < 0.85 * size(dense)
    hf_logging.set_verbosity_error()
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(str(packed))
    torch.testing.assert_close(_logits(compress.load(packed, device="cpu", kernel="reference"), IDS),
                               _logits(compress.load(dense, device="cpu", kernel="reference"), IDS))
    assert "Only `compress.load` decodes it" in (packed / "README.md").read_text()

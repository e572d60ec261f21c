"""Unstructured / N:M pruning end to end on every family: run() → dense (default) or opt-in sparse-bitmask
export → compress.load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import compress
from compress.core.sparsity import NMPattern, nm_mask, row_mask
from compress.kernels.quant_linear import QuantLinear
from compress.models.blocks import select_layers
from compress.models.load import load_model
from compress.recipes.loader import recipe_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import FAMILIES, save_tiny  # noqa: E402


def _corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(80)))
    return corpus


def _recipe(model_dir: Path, corpus: Path, stages: list[dict], sparse_format: str = "dense") -> object:
    return recipe_from_dict({"model": str(model_dir), "eval": {"enabled": False},
                             "calibration": {"dataset": str(corpus), "num_samples": 4, "seq_len": 32},
                             "stages": stages, "export": {"sparse_format": sparse_format}})


def _stored_names(out: Path) -> set[str]:
    names: set[str] = set()
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            names |= set(handle.keys())
    return names


@pytest.mark.parametrize(("pattern", "sparse_format"), [(None, "bitmask"), ("2:4", "bitmask"), (None, "dense")])
@pytest.mark.parametrize("family", FAMILIES)
def test_magnitude_export_restores_the_exact_pruned_weights(family: str, pattern: str | None, sparse_format: str,
                                                            tmp_path) -> None:
    model_dir = save_tiny(family, tmp_path / family)
    stage = {"method": "magnitude", "sparsity": 0.5, **({"pattern": pattern} if pattern else {})}
    out = tmp_path / "out"
    compress.run(_recipe(model_dir, _corpus(tmp_path), [stage], sparse_format), out)

    source = load_model(str(model_dir)).model
    loaded = compress.load(out, kernel="reference")
    names = select_layers(source)
    stored = _stored_names(out)
    for name in names:
        w = source.get_submodule(name).weight.detach()
        keep = nm_mask(w.abs(), NMPattern.parse(pattern)) if pattern else row_mask(w.abs().float(), 0.5)
        got = loaded.get_submodule(name).weight.detach()
        assert torch.equal(got, w * keep), name
        if sparse_format == "dense":
            assert f"{name}.weight" in stored or family == "gpt2", name  # GPT-2 keeps its fused c_attn name
            assert not any(n.endswith(".bitmask") for n in stored)
        else:
            assert f"{name}.bitmask" in stored and f"{name}.weight" not in stored
    if sparse_format == "dense":  # a plain checkpoint: no quantization_config any reader could misread
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
        return
    sparsity = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["format"] == "sparse-bitmask"
    assert sparsity["sparsity_structure"] == (pattern or "unstructured")
    assert len(sparsity["targets"]) == len(names)
    with torch.inference_mode():
        result = loaded(input_ids=torch.randint(3, 100, (1, 8)))
    assert torch.isfinite(result[0]).all()


def test_sparse_checkpoint_is_smaller_on_disk(tmp_path) -> None:
    """The pruned layers' stored bytes (values + bitmask + offsets) are ~53% of dense fp32 at 50%."""
    model_dir = save_tiny("llama", tmp_path / "llama")
    out = tmp_path / "out"
    compress.run(_recipe(model_dir, _corpus(tmp_path), [{"method": "wanda", "sparsity": 0.5}], "bitmask"), out)
    source = load_model(str(model_dir)).model
    dense = sum(source.get_submodule(n).weight.numel() * 4 for n in select_layers(source))
    sparse = 0
    with safe_open(str(out / "sparse-bitmask.safetensors"), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            if key.endswith((".compressed", ".bitmask", ".row_offsets", ".shape")):
                t = handle.get_tensor(key)
                sparse += t.numel() * t.element_size()
    assert sparse / dense < 0.56


def test_prune_then_gptq_keeps_two_of_four(tmp_path) -> None:
    """The built-in 2of4-w4a16 recipe: SparseGPT 2:4, then GPTQ on the pruned block, zeros preserved."""
    from compress.recipes.loader import load_recipe_data

    model_dir = save_tiny("llama", tmp_path / "llama")
    stages = load_recipe_data("2of4-w4a16")["stages"]
    for stage in stages:
        if "group_size" in stage:
            stage["group_size"] = 32
    out = tmp_path / "out"
    compress.run(_recipe(model_dir, _corpus(tmp_path), stages), out)
    loaded = compress.load(out, kernel="reference")
    quantized = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert quantized
    for name, module in quantized.items():
        w = module.dequantized_weight(torch.float32)
        assert torch.all((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2), name
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    assert not qc.get("sparsity_config")  # vLLM refuses any sparsity_config with targets


def test_sparsegpt_joint_quantization_one_stage(tmp_path) -> None:
    model_dir = save_tiny("qwen2", tmp_path / "qwen2")
    out = tmp_path / "out"
    stage = {"method": "sparsegpt", "pattern": "2:4", "bits": 4, "group_size": 32}
    result = compress.run(_recipe(model_dir, _corpus(tmp_path), [stage]), out)
    loaded = compress.load(out, kernel="reference")
    quantized = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == result.layers
    assert all(m.scheme.bits == 4 for m in quantized)
    assert all(bool(((m.dequantized_weight(torch.float32) != 0).reshape(m.out_features, -1, 4).sum(-1) <= 2).all())
               for m in quantized)


def test_per_layer_sparsity(tmp_path) -> None:
    model_dir = save_tiny("llama", tmp_path / "llama")
    out = tmp_path / "out"
    stage = {"method": "magnitude", "sparsity": 0.25, "per_layer": {"mlp.*": 0.75}}
    compress.run(_recipe(model_dir, _corpus(tmp_path), [stage]), out)
    loaded = compress.load(out, kernel="reference")
    for name in select_layers(loaded):
        w = loaded.get_submodule(name).weight
        want = 0.75 if ".mlp." in name else 0.25
        assert torch.all((w == 0).sum(1) == round(want * w.shape[1])), name

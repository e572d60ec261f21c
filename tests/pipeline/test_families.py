"""Every supported family goes through run() → export → compress.load and computes what was quantized."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import compress
from compress.core.scheme import QuantScheme
from compress.kernels.quant_linear import QuantLinear
from compress.models.blocks import select_layers
from compress.models.load import load_model
from compress.recipes.loader import recipe_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import FAMILIES, save_tiny  # noqa: E402


def _reference_logits(model_dir: Path, scheme: QuantScheme, ids: torch.Tensor) -> torch.Tensor:
    """The source model with each targeted weight replaced by its dequantized codes, in plain torch."""
    loaded = load_model(str(model_dir))
    model = loaded.model
    for name in select_layers(model):
        linear = model.get_submodule(name)
        quant = QuantLinear.from_linear(linear, scheme)
        linear.weight.data = quant.dequantized_weight(torch.float32).to(linear.weight.dtype)
    with torch.inference_mode():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_family_round_trip(family, symmetric, tmp_path):
    model_dir = save_tiny(family, tmp_path / family)
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(["the quick brown fox jumps over the lazy dog"] * 40))
    recipe = recipe_from_dict({
        "model": str(model_dir),
        "calibration": {"dataset": str(corpus), "num_samples": 2, "seq_len": 16},
        "eval": {"enabled": False},
        "stages": [{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": symmetric}],
    })
    out = tmp_path / "out"
    result = compress.run(recipe, out)
    assert result.layers > 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] is symmetric

    loaded = compress.load(out, kernel="reference")  # exact weights; fast paths are tested on their own
    quantized = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == result.layers
    assert all((m.weight_zero_point is None) == symmetric for m in quantized)
    ids = torch.randint(3, 100, (2, 12))
    with torch.inference_mode():
        out_loaded = loaded(input_ids=ids)
    got = out_loaded.logits if hasattr(out_loaded, "logits") else out_loaded.last_hidden_state
    want = _reference_logits(model_dir, QuantScheme(4, 32, symmetric), ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_act_order_round_trip(family, tmp_path):
    """GPTQ with act-order and asymmetric groups: the export (contiguous groups, no g_idx, packed zero
    points) loads back to exactly the weights it computed, on every family."""
    model_dir = save_tiny(family, tmp_path / family)
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(80)))
    recipe = recipe_from_dict({
        "model": str(model_dir),
        "calibration": {"dataset": str(corpus), "num_samples": 8, "seq_len": 32},
        "eval": {"enabled": False},
        "stages": [{"method": "gptq", "bits": 4, "group_size": 32, "symmetric": False, "act_order": True}],
    })
    out = tmp_path / "out"
    compress.run(recipe, out)
    loaded = compress.load(out, kernel="reference")  # exact weights; fast paths are tested on their own
    quantized = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert quantized and all(m.weight_g_idx is None for m in quantized.values())
    (group,) = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values()
    assert group["weights"]["actorder"] == "weight"

    reference = load_model(str(model_dir)).model
    for name, module in quantized.items():
        target = reference.get_submodule(name)
        target.weight.data = module.dequantized_weight(torch.float32).to(target.weight.dtype)
    ids = torch.randint(3, 100, (2, 12))
    with torch.inference_mode():
        got, want = loaded(input_ids=ids), reference(input_ids=ids)
    pick = (lambda o: o.logits) if hasattr(got, "logits") else (lambda o: o.last_hidden_state)
    torch.testing.assert_close(pick(got), pick(want), rtol=1e-4, atol=1e-4)

"""AutoRound: the learned-rounding arithmetic, the block solve, and its export."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import compress
from compress.core.errors import CompressError
from compress.core.primitives import compute_qparams, dequantize, quantize
from compress.core.scheme import QuantScheme
from compress.kernels.quant_linear import QuantLinear
from compress.passes.quantize.autoround import AutoRoundConfig
from compress.passes.quantize.autoround_math import Rounding, fake_quantize, final_codes
from compress.pipeline.engine import compress_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import build_model, save_tiny  # noqa: E402

IDS = torch.randint(3, 100, (16, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_the_starting_point_is_round_to_nearest(symmetric: bool, group_size: int) -> None:
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(1))
    scheme = QuantScheme(bits=3, group_size=group_size, symmetric=symmetric)
    state = Rounding.start(w, scheme)
    scale, zp = compute_qparams(w, scheme)
    rtn = dequantize(quantize(w, scale, zp, scheme), scale, zp, scheme)
    torch.testing.assert_close(fake_quantize(w, scheme, state), rtn, rtol=0, atol=1e-6)
    codes, stored, z = final_codes(w, scheme, state, torch.float32)
    assert torch.equal(codes, quantize(w, scale, zp, scheme)) and torch.equal(z, zp)


@pytest.mark.parametrize("symmetric", [True, False])
def test_stored_codes_dequantize_to_what_was_trained(symmetric: bool) -> None:
    """Away from the start (random offsets and shrinks), the stored codes and scale reproduce the trained
    fake-quantized weight exactly (float32 scales), and stay within the code range."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 64, generator=g)
    scheme = QuantScheme(bits=2, group_size=16, symmetric=symmetric)
    state = Rounding.start(w, scheme)
    with torch.no_grad():
        state.v.copy_(torch.rand(w.shape, generator=g) - 0.5)
        state.alpha.copy_(torch.rand(state.alpha.shape, generator=g) * 0.5 + 0.5)
        state.beta.copy_(torch.rand(state.beta.shape, generator=g) * 0.5 + 0.5)
    codes, scale, zp = final_codes(w, scheme, state, torch.float32)
    assert int(codes.min()) >= scheme.qmin and int(codes.max()) <= scheme.qmax
    torch.testing.assert_close(dequantize(codes, scale, zp, scheme), fake_quantize(w, scheme, state).detach(),
                               rtol=0, atol=1e-6)
    # and the offsets changed codes relative to plain rounding under the same scales
    assert not torch.equal(codes, quantize(w, scale, zp, scheme))


def test_gradients_reach_offsets_and_range_factors() -> None:
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    scheme = QuantScheme(bits=4, group_size=16, symmetric=False)
    state = Rounding.start(w, scheme)
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(4))
    loss = (x @ fake_quantize(w, scheme, state).T - x @ w.T).square().mean()
    grads = torch.autograd.grad(loss, state.parameters())
    assert len(grads) == 3 and all(float(g.abs().sum()) > 0 for g in grads)
    assert len(Rounding.start(w, scheme, learn_range=False).parameters()) == 1


def _block_output_error(model: nn.Module, fp: nn.Module) -> float:
    with torch.no_grad():
        a = model(input_ids=IDS, output_hidden_states=True).hidden_states[-1]
        b = fp(input_ids=IDS, output_hidden_states=True).hidden_states[-1]
    return float((a - b).square().mean())


def test_learned_rounding_beats_rtn_on_the_calibration_outputs() -> None:
    """At 2 bits the learned codes reproduce the fp model's last hidden states better than RTN's, and the
    layers are ordinary packed codes."""
    fp = build_model("llama")
    errors = {}
    for method in ("rtn", "autoround"):
        model = build_model("llama")
        extra = {"iters": 60} if method == "autoround" else {}
        compress_model(model, [{"method": method, "bits": 2, "group_size": 32, **extra}], IDS)
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
        errors[method] = _block_output_error(model, fp)
    assert errors["autoround"] < 0.8 * errors["rtn"], errors


def test_deterministic_and_exported_checkpoint_matches(tmp_path) -> None:
    model_dir = save_tiny("qwen2", tmp_path / "qwen2")
    recipe = {"model": str(model_dir), "eval": {"enabled": False},
              "stages": [{"method": "autoround", "bits": 4, "group_size": 32, "iters": 20}],
              "calibration": {"dataset": "demo-calib", "num_samples": 4, "seq_len": 32}}
    compress.run(compress.Recipe(**recipe), tmp_path / "a")
    compress.run(compress.Recipe(**recipe), tmp_path / "b")
    a, b = (tmp_path / d / "model.safetensors" for d in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    loaded = compress.load(tmp_path / "a", device="cpu", kernel="reference")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14
    config = (tmp_path / "a" / "config.json").read_text()
    assert '"pack-quantized"' in config and "autoround" in (tmp_path / "a" / "recipe.yaml").read_text()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a"))  # the released compressed-tensors
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS[:2]).logits, loaded(IDS[:2]).logits, rtol=1e-4, atol=1e-4)


def test_bad_settings_are_refused() -> None:
    for bad in ({"iters": 0}, {"lr": 0.0}, {"bits": 5}, {"observer": "mse"}):
        with pytest.raises(ValidationError):
            AutoRoundConfig(**bad)
    with pytest.raises(CompressError, match="calibration"):
        compress_model(build_model("llama"), [{"method": "autoround", "iters": 2}], None)

"""FP8 KV cache (``--kv-cache fp8|fp8-head``): the reader's arithmetic, the cache hook, calibration, export,
``compress.load`` and the refusals.

The arithmetic is held to compressed-tensors' own ``fake_quantize`` bit for bit (what llm-compressor and vLLM
follow). The released transformers 5.24 + compressed-tensors 0.20 do not apply ``kv_cache_scheme`` at all
(compressed-tensors looks for an attention argument ``past_key_value(s)``, transformers 5.24 calls it
``cache``): the test pins that down, so a reader that starts applying it fails here and gets compared.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DynamicCache
from typer.testing import CliRunner

import compress
from compress.cli.main import app
from compress.core.errors import CompressError
from compress.kernels.kv_cache import (
    KVAbsMax,
    attention_modules,
    install_kv_quantizer,
    kv_cache_scheme,
    kv_quantizer,
    quantize_kv,
)
from compress.passes.quantize.kv_cache import KVCacheConfig, KVCachePass
from compress.pipeline.kv_cache_step import KVCacheStep

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import build_model, save_tiny, write_rotated_corpus  # noqa: E402

runner = CliRunner()


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_arithmetic_is_compressed_tensors_fake_quantize(strategy):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 16) * 3
    x[0, 1, 2, 3] = 1e4  # beyond the range: saturates at 448 · s
    scale = torch.rand(4, 1, 1) * 0.02 + 0.001 if strategy == "attn_head" else torch.tensor([0.01])
    args = QuantizationArgs.model_validate(kv_cache_scheme(strategy))
    theirs = fake_quantize(x, scale, torch.zeros_like(scale), args)
    assert torch.equal(quantize_kv(x, scale), theirs)
    head_scale = scale.reshape(-1)[1 if scale.numel() > 1 else 0]
    assert float(quantize_kv(x, scale)[0, 1, 2, 3]) == pytest.approx(448 * float(head_scale))


def _quantized_llama(scale: float = 0.01):
    model = build_model("llama").eval()
    for module in attention_modules(model).values():
        install_kv_quantizer(module, "tensor", torch.tensor([scale]), torch.tensor([scale]))
    return model


def test_hook_quantizes_the_cache_and_the_plain_forward_alike():
    plain = build_model("llama").eval()
    model = _quantized_llama()
    with torch.no_grad():
        base = plain(_ids()).logits
        no_cache = model(_ids(), use_cache=False).logits
        cache = DynamicCache(config=model.config)
        with_cache = model(_ids(), cache=cache, use_cache=True).logits
    assert (no_cache - base).abs().max() > 1e-4  # the KV cache really is quantized
    torch.testing.assert_close(no_cache, with_cache, rtol=0, atol=1e-6)
    keys = cache.layers[0].keys  # what the cache holds lies on the e4m3 grid of its scale
    assert keys.numel() and torch.equal(quantize_kv(keys, torch.tensor([0.01])), keys)


def test_observer_and_scales_per_head():
    model = build_model("llama").eval()
    name, attention = next(iter(attention_modules(model).items()))
    observer = KVAbsMax(attention)
    with torch.no_grad():
        model(_ids())
    observer.remove()
    k_head, v_head = observer.scales(attention, "attn_head", torch.float32)
    k_tensor, _ = observer.scales(attention, "tensor", torch.float32)
    assert k_head.shape == (model.config.num_key_value_heads, 1, 1) and observer.tokens == 24
    assert float(k_tensor) == pytest.approx(float(k_head.max())) and float(v_head.min()) > 0
    with torch.no_grad():  # removed: nothing observed any more
        model(_ids())
    assert observer.tokens == 24


def test_resume_state_round_trips():
    step = KVCacheStep(KVCachePass(KVCacheConfig(strategy="head")))
    model = build_model("llama").eval()
    block = model.model.layers[0]
    attention = block.self_attn
    heads = model.config.num_key_value_heads
    install_kv_quantizer(attention, "attn_head", torch.full((heads, 1, 1), 0.02), torch.full((heads, 1, 1), 0.03))
    state = json.loads(json.dumps(step.after_block(0, block)))
    fresh = build_model("llama").model.layers[0]
    step.restore_block(0, fresh, state)
    assert torch.equal(fresh.self_attn.k_scale, attention.k_scale) and kv_quantizer(fresh.self_attn) is not None
    assert "k_scale" not in fresh.state_dict()  # block checkpoints keep the architecture's tensors only


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kv")
    model = save_tiny("llama", root / "llama")
    corpus = write_rotated_corpus(root / "calib.txt")
    out = {"model": model, "corpus": corpus}
    for kind in ("fp8", "fp8-head"):
        result = runner.invoke(app, ["quantize", str(model), "--group-size", "32", "--kv-cache", kind, "--dataset",
                                     str(corpus), "--num-samples", "4", "--seq-len", "32", "--eval-windows", "2",
                                     "--output", str(root / kind), "--json"])
        assert result.exit_code == 0, result.output
        out[kind] = root / kind
    return out


@pytest.mark.parametrize(("kind", "shape"), [("fp8", (1,)), ("fp8-head", (2, 1, 1))])
def test_export_writes_the_kv_cache_scheme(exports, kind, shape):
    data = json.loads((exports[kind] / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(data)  # the released package parses it
    assert config.kv_cache_scheme.type == "float" and config.kv_cache_scheme.num_bits == 8
    assert config.kv_cache_scheme.strategy == ("tensor" if kind == "fp8" else "attn_head")
    assert not config.kv_cache_scheme.dynamic
    with safe_open(str(exports[kind] / "model.safetensors"), "pt") as f:
        scales = {k: f.get_tensor(k) for k in f.keys() if k.endswith(("k_scale", "v_scale"))}
    assert len(scales) == 4 and all(tuple(t.shape) == shape and float(t.min()) > 0 for t in scales.values())


def test_compress_load_applies_it_and_transformers_ignores_it(exports):
    folder = exports["fp8"]
    ours = compress.load(folder, device="cpu")
    attentions = attention_modules(ours)
    assert len(attentions) == 2 and all(kv_quantizer(m) is not None for m in attentions.values())
    theirs = AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        quantized = ours(_ids()).logits
        for module in attentions.values():
            kv_quantizer(module).remove()
        plain = ours(_ids()).logits
        reader = theirs(_ids()).logits
    assert (quantized - plain).abs().max() > 1e-5
    # transformers 5.24 + compressed-tensors 0.20 load the weights and skip the KV scales (see the module doc)
    torch.testing.assert_close(reader, plain, rtol=0, atol=1e-5)


def test_inspect_reports_and_checks_the_scales(exports, tmp_path):
    result = runner.invoke(app, ["inspect", str(exports["fp8-head"]), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kv_cache"] == {"type": "fp8-e4m3", "strategy": "attn_head", "layers": 2}
    folder = _edited(exports, tmp_path, lambda q: q["kv_cache_scheme"].update(strategy="attn_head"))
    result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 2 and "strategy attn_head implies [2, 1, 1]" in result.output


def test_convert_to_gptq_refuses_to_drop_the_scales(exports, tmp_path):
    result = runner.invoke(app, ["convert", str(exports["fp8"]), "--to", "gptq", "--output", str(tmp_path / "g")])
    assert result.exit_code == 2 and "kv_cache_scheme" in result.output and not (tmp_path / "g").exists()


def test_eval_measures_the_quantized_cache(exports):
    result = runner.invoke(app, ["eval", str(exports["fp8"]), "--baseline", str(exports["model"]), "--dataset",
                                 str(exports["corpus"]), "--seq-len", "32", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kl"] > 0


@pytest.mark.parametrize(("flags", "needle"), [
    (["--kv-cache", "int4"], "unknown --kv-cache"),
    (["--kv-cache", "fp8", "--format", "gptq"], "no place for KV-cache scales"),
    (["--method", "kv_cache"], "not a weight quantization method"),
])
def test_cli_refusals_before_loading(flags, needle, tmp_path):
    result = runner.invoke(app, ["quantize", str(tmp_path / "missing"), *flags, "--no-eval", "--output",
                                 str(tmp_path / "out")])
    assert result.exit_code == 2 and needle in result.output and not (tmp_path / "out").exists()


def test_kv_stage_must_be_last_and_needs_attention(tmp_path, exports):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {exports['model']}\nstages:\n  - method: kv_cache\n  - method: rtn\n    group_size: 32\n")
    result = runner.invoke(app, ["run", str(recipe), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "must be the last stage" in result.output
    encoder = save_tiny("bert", tmp_path / "bert")
    result = runner.invoke(app, ["quantize", str(encoder), "--group-size", "32", "--kv-cache", "fp8", "--dataset",
                                 str(exports["corpus"]), "--num-samples", "2", "--seq-len", "16", "--no-eval",
                                 "--output", str(tmp_path / "bert-out")])
    assert result.exit_code == 2 and "no KV cache to quantize" in result.output
    assert not (tmp_path / "bert-out").exists()


def _edited(exports, tmp_path, edit_config=None, edit_tensors=None) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(exports["fp8"], folder)
    if edit_config is not None:
        data = json.loads((folder / "config.json").read_text())
        edit_config(data["quantization_config"])
        (folder / "config.json").write_text(json.dumps(data))
    if edit_tensors is not None:
        tensors = load_file(folder / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(("edit_config", "edit_tensors", "needle"), [
    (lambda q: q["kv_cache_scheme"].update(type="int"), None, "served here only as FP8"),
    (lambda q: q["kv_cache_scheme"].update(dynamic=True), None, "served here only as FP8"),
    (None, lambda t: t.pop("model.layers.1.self_attn.v_scale"), "lacks tensor model.layers.1.self_attn.v_scale"),
    (None, lambda t: t.update({"model.layers.0.self_attn.k_scale": torch.tensor([-1.0])}), "positive finite"),
    (lambda q: q.update(kv_cache_scheme=None), None, "has no kv_cache_scheme"),
])
def test_load_refusals_are_one_sentence(exports, tmp_path, edit_config, edit_tensors, needle):
    folder = _edited(exports, tmp_path, edit_config, edit_tensors)
    with pytest.raises(CompressError, match=needle) as caught:
        compress.load(folder, device="cpu")
    assert "\n" not in str(caught.value)

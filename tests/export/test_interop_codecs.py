"""Layouts beyond pack-quantized, written by ``export/checkpoint.py`` and read by the released readers.

A tiny llama gets its block layers re-encoded by a codec (``compress.codecs.quantize_linear``: FP8
``float-quantized``, int8 ``int-quantized``, or a mix with ``pack-quantized``) and is written through the
exporter. transformers + compressed-tensors must load each folder with the logits ``compress.load`` gives,
the package's own decompressor must reconstruct our dense weights bit for bit, and what we cannot serve
(dynamic input activations) must be refused in one sentence rather than run silently wrong.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import compressed_tensors  # noqa: F401  (a released reader: missing is a failure, never a skip)
import pytest
import torch
from compressed_tensors.compressors.naive_quantized import NaiveQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import compress
from compress.codecs import quantize_linear
from compress.core.errors import CompressError
from compress.core.qargs import QuantArgs
from compress.core.scheme import QuantScheme
from compress.export.checkpoint import checkpoint_tensors, quantization_config, write_config, write_weights
from compress.kernels.quant_linear import QuantLinear
from compress.models.blocks import find_linears, select_layers
from compress.pipeline.sequential import swap_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny  # noqa: E402

FP8 = QuantScheme(weights=QuantArgs(num_bits=8, type="float", strategy="channel"))
FP8_TENSOR = QuantScheme(weights=QuantArgs(num_bits=8, type="float", strategy="tensor"))
W8 = QuantScheme(8, -1)
W4 = QuantScheme(4, 32)


def _layout(name: str, index: int) -> tuple[str, QuantScheme]:
    """Which codec and scheme layer ``index`` of a model gets, per case."""
    return {
        "fp8": ("float-quantized", FP8),
        "fp8-tensor": ("float-quantized", FP8_TENSOR),
        "int8": ("int-quantized", W8),
        "mixed": ("float-quantized", FP8) if index % 2 else ("pack-quantized", W4),
    }[name]


def export(source: Path, out: Path, case: str, dtype: torch.dtype = torch.float32) -> Path:
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    linears = find_linears(model)
    for index, name in enumerate(select_layers(model)):
        fmt, scheme = _layout(case, index)
        swap_module(model, name, quantize_linear(linears[name], scheme, format=fmt))
    out.mkdir()
    write_weights(checkpoint_tensors(model), out, 10**9)
    write_config(model.config, out, quantization_config(model, list(linears)))
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("codecs")
    source = save_tiny("llama", root / "llama")
    out = {case: export(source, root / case, case) for case in ("fp8", "fp8-tensor", "int8", "mixed")}
    out["fp8-bf16"] = export(source, root / "fp8-bf16", "fp8", torch.bfloat16)
    return out


def _quant_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def test_formats_are_written_per_codec(folders) -> None:
    assert _quant_config(folders["fp8"])["format"] == "float-quantized"
    assert _quant_config(folders["int8"])["format"] == "int-quantized"
    mixed = _quant_config(folders["mixed"])
    assert mixed["format"] == "mixed-precision"
    assert sorted(g["format"] for g in mixed["config_groups"].values()) == ["float-quantized", "pack-quantized"]
    tensors = load_file(folders["fp8"] / "model.safetensors")
    layer = "model.layers.0.mlp.down_proj"
    assert tensors[f"{layer}.weight"].dtype == torch.float8_e4m3fn
    assert tensors[f"{layer}.weight_scale"].shape == (64, 1)
    assert f"{layer}.weight_shape" not in tensors  # kept in memory only: these readers take the shape from weight
    assert load_file(folders["fp8-tensor"] / "model.safetensors")[f"{layer}.weight_scale"].shape == (1,)
    assert load_file(folders["int8"] / "model.safetensors")[f"{layer}.weight"].dtype == torch.int8
    for case in folders:
        QuantizationConfig.model_validate(_quant_config(folders[case]))  # the package accepts every config


@pytest.mark.parametrize("case", ["fp8", "fp8-tensor", "int8", "fp8-bf16"])
def test_package_decompresses_to_our_weights(folders, case) -> None:
    folder = folders[case]
    config = QuantizationConfig.model_validate(_quant_config(folder))
    (scheme,) = config.config_groups.values()
    tensors = load_file(folder / "model.safetensors")
    ours = compress.load(folder, device="cpu", kernel="reference")
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14 and {m.format for m in layers.values()} == {config.format}
    for name, layer in layers.items():
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        dense = NaiveQuantizationCompressor.decompress(local, scheme)["weight"]
        assert torch.equal(dense, layer.dequantized_weight(dense.dtype)), name


INT8_READER_GAP = ("transformers (5.24, compressed-tensors 0.20) builds every weight-only int layer as pack-quantized "
                   "whatever the stored format says, so the int8 `weight` tensors do not fit; dequantize=True loads them")


@pytest.mark.parametrize("case", ["fp8", "fp8-tensor", pytest.param("int8", marks=pytest.mark.xfail(
    strict=True, raises=RuntimeError, reason=INT8_READER_GAP)), "mixed", "fp8-bf16", "int8-dequantize"])
def test_transformers_loads_our_checkpoint(folders, case) -> None:
    """transformers' compressed-tensors loader gives the logits ``compress.load`` gives (reference kernel)."""
    from transformers import CompressedTensorsConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    folder = folders[case.removesuffix("-dequantize")]
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if case.endswith("-dequantize") else {}
    theirs = AutoModelForCausalLM.from_pretrained(str(folder), **extra)
    ours = compress.load(folder, device="cpu", kernel="reference")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = theirs(ids).logits.float(), ours(ids).logits.float()
    tol = 2e-2 if case.endswith("bf16") else 1e-4
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_auto_kernel_serves_fp8_dense_and_exact(folders) -> None:
    """No packed kernel reads FP8 on the CPU: auto gives every such layer the dense path (never slower than
    dense), with the reference's exact numbers."""
    auto = compress.load(folders["fp8"], device="cpu", kernel="auto")
    reference = compress.load(folders["fp8"], device="cpu", kernel="reference")
    assert auto.compress_kernels == {"dense": 14}
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(auto(ids).logits, reference(ids).logits)
    with pytest.raises(CompressError, match="the cpu kernels read pack-quantized layers and this one is float"):
        compress.load(folders["fp8"], device="cpu", kernel="cpu")


def test_inspect_reports_fp8_layers(folders) -> None:
    from compress.evaluate.inspect import inspect_checkpoint

    report = inspect_checkpoint(folders["mixed"])
    by_name = {layer["name"]: layer for layer in report["layers"]}
    assert report["format"] == "mixed-precision" and len(by_name) == 14
    assert by_name["model.layers.0.self_attn.k_proj"]["scheme"] == "wfp8"
    assert by_name["model.layers.0.self_attn.q_proj"]["scheme"] == "w4g32"
    # 8-bit codes plus one fp32 scale per 64-wide row
    assert by_name["model.layers.0.self_attn.k_proj"]["bits_per_weight"] == pytest.approx(8 + 32 / 64)


@pytest.mark.parametrize(("edit", "needle"), [
    # e4m3 weights with int8 inputs: no reader pairs them (FP8 inputs are served: tests/export/test_interop_fp8.py)
    (lambda g: g.__setitem__("input_activations", QuantArgs(num_bits=8, type="int", strategy="token",
                                                             dynamic=True).to_dict()),
     "no kernel here quantizes input activations"),
    (lambda g: g["weights"].__setitem__("strategy", "group") or g["weights"].__setitem__("group_size", 32),
     "per channel or per tensor, not per group"),
    (lambda g: g.__setitem__("format", "nvfp4-pack-quantized"), "format 'nvfp4-pack-quantized' is not supported"),
    (lambda g: g.__setitem__("format", "pack-quantized"), "is stored as float-quantized"),
])
def test_unservable_schemes_are_one_sentence(folders, tmp_path, edit, needle) -> None:
    """Input activations no kernel here runs and other forms no codec serves are refused, never run as W8A16."""
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(folders["fp8"], folder)
    data = json.loads((folder / "config.json").read_text())
    edit(data["quantization_config"]["config_groups"]["group_0"])
    (folder / "config.json").write_text(json.dumps(data))
    for call in (lambda: compress.load(folder, device="cpu"),
                 lambda: __import__("compress.evaluate.inspect").evaluate.inspect.inspect_checkpoint(folder)):
        with pytest.raises(CompressError, match=needle) as caught:
            call()
        assert "\n" not in str(caught.value)

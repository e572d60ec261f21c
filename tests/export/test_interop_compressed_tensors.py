"""What ``compress quantize`` writes, read by the compressed-tensors package itself (and by transformers).

For each quantized layer, the package's own ``PackedQuantizationCompressor.decompress`` is run over the tensors
of our safetensors file with the scheme the package parses from our ``config.json``; its dense weight must equal
``QuantLinear.dequantized_weight`` bit for bit. That is the reader vLLM and llm-compressor share.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The released readers are dev dependencies: a missing one is a failure here, never a skip.
import compressed_tensors  # noqa: F401
import pytest
import torch
import transformers
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file
from typer.testing import CliRunner

import compress
from compress.cli.main import app
from compress.kernels.quant_linear import QuantLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny, write_rotated_corpus  # noqa: E402

runner = CliRunner()
CASES = {"w4g32": ("--bits", "4", "--group-size", "32"),
         "w4g32a": ("--bits", "4", "--group-size", "32", "--asym"),
         "w8": ("--bits", "8", "--group-size", "-1"),
         "w3g32": ("--bits", "3", "--group-size", "32"),
         "w2g32": ("--bits", "2", "--group-size", "32"),
         "w4-act-order": ("--bits", "4", "--group-size", "32", "--act-order")}
ASYM_BROKEN = tuple(int(p) for p in transformers.__version__.split(".")[:2]) in ((5, 23), (5, 24))
"""transformers 5.23-5.24 refuse asymmetric pack-quantized checkpoints (ours and llm-compressor's): the loader
allocates weight_zero_point at the unpacked shape [out, groups] and rejects the packed [out*b/32, groups]
tensor that the package's own compressor writes and decompresses. 5.22 loads them. Reproduction:
benchmarks/repro_transformers_asym_zero_point.py."""


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interop")
    model = save_tiny("llama", root / "llama")
    corpus = root / "calib.txt"
    write_rotated_corpus(corpus)
    folders = {}
    for tag, flags in CASES.items():
        out = root / tag
        result = runner.invoke(app, ["quantize", str(model), *flags, "--dataset", str(corpus), "--num-samples", "4",
                                     "--seq-len", "32", "--no-eval", "--output", str(out), "--json"])
        assert result.exit_code == 0, result.output
        folders[tag] = out
    return folders


def _package_scheme(folder: Path):
    data = json.loads((folder / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(data)
    assert config.format == "pack-quantized"
    (scheme,) = config.config_groups.values()
    return scheme


@pytest.mark.parametrize("tag", list(CASES))
def test_package_decompresses_to_our_weights(outputs, tag):
    folder = outputs[tag]
    scheme = _package_scheme(folder)
    tensors = load_file(folder / "model.safetensors")
    ours = compress.load(folder, device="cpu", kernel="reference")
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        dense = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        expected = layer.dequantized_weight(dense.dtype)
        assert dense.shape == expected.shape
        assert torch.equal(dense, expected), name


def _compare_with_ours(theirs, folder: Path) -> None:
    ours = compress.load(folder, device="cpu", kernel="reference")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the package decompresses on the first forward (a pre-hook), so run it first
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    for name, layer in ours.named_modules():
        if isinstance(layer, QuantLinear):
            weight = theirs.get_submodule(name).weight
            assert torch.equal(weight, layer.dequantized_weight(weight.dtype)), name


@pytest.mark.parametrize("tag", [
    pytest.param(tag, marks=pytest.mark.xfail(ASYM_BROKEN and tag.endswith("a"), strict=True,
                                              reason="transformers 5.23-5.24 zero-point shape regression"))
    for tag in CASES])
def test_transformers_loads_our_checkpoint(outputs, tag):
    """transformers' own compressed-tensors loader (decompresses on load) gives our dense weights and logits."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    folder = outputs[tag]
    hf_logging.set_verbosity_error()
    _compare_with_ours(AutoModelForCausalLM.from_pretrained(str(folder)), folder)


def test_asymmetric_workaround_loads_in_every_transformers(outputs):
    """The workaround the README and model card give for 5.23-5.24 works (and is harmless elsewhere)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    folder = outputs["w4g32a"]
    theirs = AutoModelForCausalLM.from_pretrained(str(folder),
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    _compare_with_ours(theirs, folder)


def test_act_order_is_written_with_contiguous_groups(outputs):
    """Readers refuse ``actorder: group`` (compressed-tensors >= 0.19, vLLM, GPTQModel): act-order must be
    exported as ``actorder: weight`` without g_idx."""
    folder = outputs["w4-act-order"]
    data = json.loads((folder / "config.json").read_text())["quantization_config"]
    (group,) = data["config_groups"].values()
    assert group["weights"]["actorder"] == "weight"
    assert not any(k.endswith("g_idx") for k in load_file(folder / "model.safetensors"))
    QuantizationConfig.model_validate(data)  # the released package accepts it

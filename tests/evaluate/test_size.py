"""Sizes: logical parameter counts and byte breakdowns read from safetensors headers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from compress.core.errors import CompressError
from compress.evaluate.size import (
    dir_size_bytes,
    parameter_count,
    safetensors_header_meta,
    weights_bytes_by_component,
)


class FakeQuantLinear(nn.Module):
    """Shaped like QuantLinear: packed storage plus a ``weight_shape`` buffer naming the logical shape."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 8, dtype=torch.int32))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features]))
        self.weight_scale = nn.Parameter(torch.ones(out_features, 1))  # storage, not a logical parameter
        self.bias = nn.Parameter(torch.zeros(out_features))


def test_parameter_count_uses_weight_shape():
    model = nn.Sequential(nn.Linear(8, 6), FakeQuantLinear(5, 16))
    assert parameter_count(model) == (8 * 6 + 6) + (5 * 16 + 5)


def test_parameter_count_counts_tied_weights_once():
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=97,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert parameter_count(model) == sum(p.numel() for p in model.parameters())
    untied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    untied[1].weight = untied[0].weight
    assert parameter_count(untied) == 40


@pytest.fixture
def checkpoint(tmp_path):
    save_file(
        {
            "layer.weight_packed": torch.zeros(4, 2, dtype=torch.int32),  # 32 bytes
            "layer.weight_scale": torch.zeros(4, 1, dtype=torch.bfloat16),  # 8
            "layer.weight_zero_point": torch.zeros(4, 1, dtype=torch.int8),  # 4
            "layer.weight_shape": torch.tensor([4, 16]),  # 16
            "emb.weight": torch.zeros(10, 4),  # 160
        },
        str(tmp_path / "model.safetensors"),
    )
    save_file({"norm.weight": torch.zeros(3, dtype=torch.float16)}, str(tmp_path / "extra.safetensors"))  # 6
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def test_header_meta_and_component_bytes(checkpoint):
    meta = safetensors_header_meta(checkpoint)
    assert meta["layer.weight_packed"] == ("I32", [4, 2])
    assert meta["layer.weight_scale"] == ("BF16", [4, 1])
    assert meta["layer.weight_shape"] == ("I64", [2])
    assert meta["norm.weight"] == ("F16", [3])
    assert weights_bytes_by_component(meta) == {"quantized weights": 32, "scales/zeros": 28, "dense": 166}


def test_component_bytes_reject_unknown_dtype():
    assert weights_bytes_by_component({"x.weight": ("torch.float32", [2, 2])})["dense"] == 16
    with pytest.raises(CompressError, match="unknown dtype"):
        weights_bytes_by_component({"x.weight": ("Q3", [2])})


def test_dir_size_counts_weight_files_only(checkpoint, tmp_path_factory):
    expected = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    (checkpoint / "training_args.bin").write_bytes(b"x" * 1000)
    assert dir_size_bytes(checkpoint) == expected
    (checkpoint / "pytorch_model.bin").write_bytes(b"x" * 100)
    assert dir_size_bytes(checkpoint) == expected + 100
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(CompressError):
        dir_size_bytes(empty)
    with pytest.raises(CompressError):
        safetensors_header_meta(empty)


def test_corrupt_safetensors_is_bad_input(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(CompressError):
        safetensors_header_meta(tmp_path)


def test_component_bytes_follow_each_layers_codec():
    """Which leaves are codes is the codec's to say: an FP8 layer's codes sit in ``P.weight`` (a name a dense
    layer also has), a sparse layer's kept values are dense values, and an unclaimed ``weight`` is dense."""
    meta = {
        "fp8.weight": ("F8_E4M3", [4, 16]),  # 64 bytes of codes
        "fp8.weight_scale": ("F32", [4, 1]),  # 16
        "fp8.bias": ("F32", [4]),  # 16, dense
        "sp.compressed": ("F32", [8]),  # 32, kept values: dense
        "sp.bitmask": ("U8", [4, 2]),  # 8, index
        "sp.row_offsets": ("I64", [4]),  # 32, index
        "sp.shape": ("I64", [2]),  # 16
        "plain.weight": ("F32", [2, 2]),  # 16
    }
    assert weights_bytes_by_component(meta) == {"quantized weights": 64, "scales/zeros": 16 + 8 + 32 + 16,
                                                "dense": 16 + 32 + 16}


def test_packed_tensors_without_config_go_to_compress_load(tmp_path):
    """A folder holding any registered layout's tensors but no quantization_config is routed to compress.load
    (which refuses it in one sentence), never to transformers' random init; a plain folder is not."""
    from compress.pipeline.evaluation import is_compressed

    (tmp_path / "config.json").write_text("{}")
    save_file({"l.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    assert not is_compressed(tmp_path)
    save_file({"l.weight": torch.zeros(4, 4, dtype=torch.int8), "l.weight_scale": torch.ones(4, 1)},
              str(tmp_path / "model.safetensors"))
    assert is_compressed(tmp_path)

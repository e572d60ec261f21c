"""``--resume`` rebuilds saved quantized layers through their codec: the state names the layout and the scheme,
and the saved block tensors are validated like a checkpoint's."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compress.codecs import quantize_linear
from compress.core.errors import CompressError
from compress.core.qargs import QuantArgs
from compress.core.scheme import QuantScheme
from compress.pipeline.resume import describe, rebuild

SCHEMES = {"pack-quantized": QuantScheme(4, 32, False), "int-quantized": QuantScheme(8, -1),
           "float-quantized": QuantScheme(weights=QuantArgs(num_bits=8, type="float", strategy="channel"))}


@pytest.mark.parametrize("name", ["pack-quantized", "float-quantized", "int-quantized"])
def test_resume_rebuilds_a_layer_through_its_codec(name: str) -> None:
    """``--resume`` records the layer's codec and scheme and rebuilds it from the saved block tensors."""
    layer = quantize_linear(nn.Linear(64, 32), SCHEMES[name], format=name)
    desc = json.loads(json.dumps(describe(layer)))  # it is stored in progress.json
    saved = {f"blk.fc.{k}": v.clone() for k, v in layer.state_dict().items()}
    again = rebuild(desc, saved, "blk.fc")
    assert (again.format, again.scheme) == (name, layer.scheme)
    assert torch.equal(again.dequantized_weight(), layer.dequantized_weight())
    saved["blk.fc.weight_scale"] = torch.zeros(3)  # a state that disagrees with itself is refused, named
    with pytest.raises(CompressError, match="blk.fc.weight_scale"):
        rebuild(desc, saved, "blk.fc")
    empty = rebuild(desc)  # the layout without tensors, ready for load_state_dict
    empty.load_state_dict(layer.state_dict())
    assert torch.equal(empty.dequantized_weight(), layer.dequantized_weight())

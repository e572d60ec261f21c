"""The GPTQ checkpoint layout (``quant_method: gptq``) for whole models: one scheme, ``quantize_config.json``.

Per layer the layout is the GPTQ codec's (``compress/codecs/gptq.py``: tensors, the v1 zero-point trap,
which shapes it can express); its names are re-exported here for the exporter and ``convert``. This module
adds what only a whole model has: the single scheme GPTQ's config can carry, the dense-layer rule, the config
with our ``meta.quantizer``, and the model-wide conversions in both directions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from compress.codecs.gptq import (
    CHECKPOINT_FORMATS,
    GPTQ,
    GPTQ_SUFFIXES,
    check_expressible,
    checkpoint_format,
    layer_from_gptq,
    layer_to_gptq,
    read_gptq_config,
)
from compress.codecs.pack_quantized import PACK_QUANTIZED
from compress.core.errors import CompressError
from compress.core.scheme import QuantScheme

__all__ = ["CHECKPOINT_FORMATS", "GPTQ_SUFFIXES", "QUANTIZE_CONFIG_NAME", "check_expressible", "check_no_dense_in_blocks",
           "checkpoint_format", "compressed_tensors_config", "from_gptq", "gptq_config", "gptq_layer_names",
           "layer_from_gptq", "layer_to_gptq", "read_gptq_config", "single_scheme", "to_gptq",
           "write_quantize_config"]

logger = logging.getLogger("compress")

QUANTIZE_CONFIG_NAME = "quantize_config.json"


def single_scheme(schemes: Mapping[str, QuantScheme]) -> QuantScheme:
    """The one scheme of the model; GPTQ's config has room for exactly one."""
    distinct = sorted({s.tag for s in schemes.values()})
    if not schemes:
        raise CompressError("the model has no quantized layers to write in the GPTQ layout")
    if len(distinct) > 1:
        raise CompressError(f"the GPTQ layout holds one scheme per model but this one mixes {', '.join(distinct)}; "
                            "export it as compressed-tensors")
    return next(iter(schemes.values()))


def check_no_dense_in_blocks(dense_in_blocks: Iterable[str]) -> None:
    """GPTQ readers quantize every Linear inside the decoder blocks; a dense one there cannot be described."""
    dense = sorted(dense_in_blocks)
    if dense:
        raise CompressError(f"layer {dense[0]} inside a decoder block is left dense, which the GPTQ layout cannot "
                            "express; quantize it or export as compressed-tensors")


def gptq_config(scheme: QuantScheme, *, desc_act: bool, lm_head: bool = False,
                meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``quantize_config.json`` (also ``config.json["quantization_config"]``). ``meta.quantizer`` names us only."""
    from compress.export.manifest import tool_version

    return GPTQ.config(scheme, desc_act=desc_act, lm_head=lm_head,
                       meta={**(meta or {}), "quantizer": f"compress-toolkit {tool_version()}"})


def gptq_layer_names(tensors: Iterable[str]) -> list[str]:
    return GPTQ.layers(tensors)


def to_gptq(tensors: Mapping[str, Tensor], schemes: Mapping[str, QuantScheme], *,
            dense_in_blocks: Iterable[str] = (), meta: Mapping[str, Any] | None = None
            ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A compressed-tensors state dict → (GPTQ state dict, GPTQ quantization_config). Dense tensors pass through."""
    scheme = single_scheme(schemes)
    GPTQ.check(scheme)
    check_no_dense_in_blocks(dense_in_blocks)
    quantized = set(schemes)
    out = {n: t for n, t in tensors.items() if n.rpartition(".")[0] not in quantized or n.endswith(".bias")}
    lossy_layers = []
    for name in sorted(quantized):
        layer, lossy = layer_to_gptq(name, tensors, scheme)
        out.update(layer)
        if lossy:
            lossy_layers.append(name)
    if lossy_layers:
        dtype = PACK_QUANTIZED.scale_of(lossy_layers[0], tensors).dtype
        logger.warning(f"the GPTQ layout stores scales as float16: {len(lossy_layers)} layers' {dtype} scales "
                       "were rounded (dequantized weights differ by at most that rounding)")
    desc_act = any(f"{n}.weight_g_idx" in tensors for n in quantized)
    config = gptq_config(scheme, desc_act=desc_act, lm_head=any(n.split(".")[-1] == "lm_head" for n in quantized),
                         meta=meta)
    return out, config


def from_gptq(tensors: Mapping[str, Tensor], config: Mapping[str, Any], origin: dict[str, str] | None = None
              ) -> tuple[dict[str, Tensor], dict[str, QuantScheme]]:
    """A GPTQ state dict → (compressed-tensors state dict, scheme per quantized layer). ``origin`` is updated."""
    scheme, fmt, desc_act = read_gptq_config(config)
    names = gptq_layer_names(tensors)
    layer_set = set(names)
    out = {n: t for n, t in tensors.items()
           if not (n.rpartition(".")[0] in layer_set and n.rpartition(".")[2] in GPTQ.leaves)}
    for name in names:
        converted = layer_from_gptq(name, tensors, scheme, fmt, desc_act, origin)
        out.update(converted)
        if origin is not None:
            for key in converted:
                origin.setdefault(key, origin.get(f"{name}.{GPTQ.marker}", "?"))
    return out, {n: scheme for n in names}


def compressed_tensors_config(schemes: Mapping[str, QuantScheme], has_g_idx: bool, ignore: Iterable[str]
                              ) -> dict[str, Any]:
    """The compressed-tensors ``quantization_config`` of a model with one scheme (what GPTQ can carry)."""
    scheme = single_scheme(schemes)
    return {
        "quant_method": "compressed-tensors",
        "format": PACK_QUANTIZED.name,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], **PACK_QUANTIZED.config(scheme, has_g_idx=has_g_idx)}},
        "ignore": sorted(set(ignore) - set(schemes)),
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }


def write_quantize_config(out_dir: Path, config: Mapping[str, Any]) -> Path:
    path = out_dir / QUANTIZE_CONFIG_NAME
    path.write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return path


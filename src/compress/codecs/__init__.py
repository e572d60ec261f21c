"""Codecs: one registered codec per storage layout of a compressed Linear (``codecs/base.py`` says why).

Registered by importing their modules below: ``pack-quantized`` (the default every pass produces),
``naive-quantized`` / ``int-quantized`` (int8 codes), ``float-quantized`` (FP8), ``sparse-bitmask`` (pruned
dense values) and ``gptq``. A new layout is one module in this package whose codec instance is passed to
``register``, plus its name in the import below. Nothing else changes: the loader, ``inspect``,
``convert``, the exporter and ``--resume`` find it in ``CODECS``.

Layer rule: codecs sit above ``kernels`` (``rebuild`` makes ``QuantLinear`` modules) and below
``calibrate`` / ``passes`` / ``export``; their tensor math lives in ``core``.
"""

from __future__ import annotations

from compress.codecs import float_quantized, gptq, naive_quantized, pack_quantized, sparse_bitmask  # noqa: F401
from compress.codecs.base import CODECS, Codec, StorageCodec, all_codecs, register
from compress.codecs.plan import StoredLayer, check_quant_config, layer_plan, scheme_for

__all__ = ["CODECS", "Codec", "StorageCodec", "StoredLayer", "all_codecs", "check_quant_config", "codec",
           "layer_plan", "quantize_linear", "register", "scheme_for"]


def codec(name: str) -> Codec:
    """The registered codec ``name`` (CompressError listing the known ones otherwise)."""
    return CODECS.get(name)


def quantize_linear(linear, scheme, format: str = "pack-quantized", **qparams):
    """``linear`` as a ``QuantLinear`` in layout ``format`` (e.g. ``float-quantized`` for W8A16-FP8)."""
    layout = CODECS.get(format)
    if not isinstance(layout, StorageCodec):
        raise TypeError(f"{format} does not store quantized layers")
    return layout.quantize_linear(linear, scheme, **qparams)

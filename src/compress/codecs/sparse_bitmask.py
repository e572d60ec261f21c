"""``sparse-bitmask``: a pruned dense weight as its kept values plus one bit per weight (``core/sparsity.py``).

Opt-in (``export.sparse_format: bitmask``): current readers cannot decode it (FORMATS.md), so the exporter
writes it under a file name they do not look for, and only ``compress.load`` reads it back. It stores
dense values, not codes: there is no scheme, and the runnable layer is an ordinary ``nn.Linear``. At load
the decoded weight goes back under ``P.weight`` so the architecture's own module takes it (including the
Conv1D layout of GPT-2-style models, which the writer kept).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from compress.codecs.base import Codec, HeaderMeta, header_fail, register
from compress.core.errors import CompressError
from compress.core.scheme import QuantScheme
from compress.core.sparsity import BITMASK_SUFFIXES, from_bitmask, to_bitmask


class SparseBitmaskCodec(Codec):
    name = "sparse-bitmask"
    quant_method = None  # lives in ``sparsity_config``, beside any quantization method
    marker = "bitmask"
    leaves = BITMASK_SUFFIXES
    code_leaves = ("compressed",)
    transformers_reads = False
    readers = (
        "The pruned layers are stored in compressed-tensors' `sparse-bitmask` layout (kept values plus one",
        "bit per weight, asked for with `export.sparse_format: bitmask`). Only `compress.load` decodes it",
        "today: current transformers + compressed-tensors and vLLM cannot, so the weights are deliberately",
        "not named `model.safetensors` and those readers refuse the folder instead of loading random",
        "weights. Re-export with the default `sparse_format: dense` for a checkpoint every reader loads.",
    )
    shape_leaves = ("shape",)
    quantized = False

    def unsupported(self, scheme: QuantScheme | None) -> str | None:
        return None if scheme is None else "it stores dense values, which a quantized layer does not have"

    def encode(self, weight: Tensor, scheme: QuantScheme | None = None, *, keep: Tensor | None = None,
               **_: Any) -> dict[str, Tensor]:
        """The four tensors; ``keep`` defaults to ``weight != 0`` (the mask, not the value, decides)."""
        self.check(scheme)
        return to_bitmask(weight.detach().to("cpu"), keep)

    def take(self, prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Remove the layer's entries from ``tensors`` (leaf → tensor)."""
        return {leaf: tensors.pop(f"{prefix}.{leaf}") for leaf in self.leaves if f"{prefix}.{leaf}" in tensors}

    def decode(self, prefix: str, tensors: Mapping[str, Tensor], scheme: QuantScheme | None = None,
               **_: Any) -> Tensor:
        parts = {leaf: tensors[f"{prefix}.{leaf}"] for leaf in self.leaves if f"{prefix}.{leaf}" in tensors}
        return from_bitmask(parts, prefix)

    def config(self, scheme: QuantScheme | None = None, *, targets: list[str], global_sparsity: float,
               structure: str, **_: Any) -> dict[str, Any]:
        """compressed-tensors' ``sparsity_config`` for the bitmask-stored layers."""
        return {"format": self.name, "global_sparsity": global_sparsity, "sparsity_structure": structure,
                "targets": targets, "ignore": []}

    def rebuild(self, prefix: str, tensors: Mapping[str, Tensor], scheme: QuantScheme | None,
                bias: Tensor | None, **_: Any) -> nn.Module:
        """A dense ``nn.Linear`` with the decoded weight (in the stored ``[out, in]`` orientation)."""
        weight = self.decode(prefix, tensors)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                           device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return linear

    def header_shape(self, prefix: str, meta: HeaderMeta, scheme: QuantScheme | None,
                     values: Mapping[str, list[int]]) -> tuple[int, int]:
        shape = values.get(f"{prefix}.shape")
        if shape is None or len(shape) != 2 or min(shape) <= 0:
            raise CompressError(f"sparse tensor {prefix}.shape must hold two positive integers")
        rows, cols = shape
        for leaf, want in (("bitmask", ("U8", [rows, (cols + 7) // 8])), ("row_offsets", ("I64", [rows]))):
            key = f"{prefix}.{leaf}"
            if key not in meta:
                raise header_fail(prefix, leaf, "is missing")
            if (meta[key][0], list(meta[key][1])) != want:
                raise header_fail(prefix, leaf, f"is {meta[key][0]} {list(meta[key][1])}, expected {want[0]} {want[1]}")
        if f"{prefix}.compressed" not in meta or len(meta[f"{prefix}.compressed"][1]) != 1:
            raise header_fail(prefix, "compressed", "must be a 1-D tensor of the kept values")
        return rows, cols


SPARSE_BITMASK = register(SparseBitmaskCodec())

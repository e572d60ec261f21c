"""QuantLinear: an ``nn.Linear`` replacement whose ``state_dict()`` IS the compressed-tensors checkpoint.

Buffers carry the checkpoint names (``weight_packed``, ``weight_scale``, ``weight_zero_point`` only when
asymmetric, ``weight_g_idx`` only with activation ordering, ``weight_shape``) so exporting is
``model.state_dict()`` and loading is ``load_state_dict`` into modules built with ``__init__``.
The forward goes through ``compress::dequant_matmul`` and never branches on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.core.errors import CompressError
from compress.core.packing import PackedWeight, pack_weight, packed_size, scale_dtype_for
from compress.core.scheme import QuantScheme
from compress.kernels.ops import dequant_matmul_op
from compress.kernels.reference import compute_dtype


class QuantLinear(nn.Module):
    """A Linear layer stored as packed integer codes plus per-group scales."""

    weight_packed: Tensor
    weight_scale: Tensor
    weight_shape: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        *,
        bias: bool,
        has_g_idx: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate zeroed buffers of the checkpoint shapes, ready for ``load_state_dict``."""
        super().__init__()
        scheme.validate()
        self.kernel = None  # a compress.kernels.paths.KernelPath chosen at load; None = the reference op
        self._dense_cache: Tensor | None = None  # see hold_dense_weight
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        n_groups = scheme.n_groups(in_features)
        int32 = dict(dtype=torch.int32, device=device)
        self.register_buffer(
            "weight_packed", torch.zeros(out_features, packed_size(in_features, scheme.bits), **int32)
        )
        self.register_buffer(
            "weight_scale", torch.ones(out_features, n_groups, dtype=scale_dtype, device=device)
        )
        if not scheme.symmetric:
            self.register_buffer(
                "weight_zero_point", torch.zeros(packed_size(out_features, scheme.bits), n_groups, **int32)
            )
        else:
            self.weight_zero_point = None
        if has_g_idx:
            self.register_buffer(
                "weight_g_idx", torch.arange(in_features, **int32) // scheme.effective_group_size(in_features)
            )
        else:
            self.weight_g_idx = None
        self.register_buffer(
            "weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device)
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=scale_dtype, device=device)) if bias else None
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        scheme: QuantScheme,
        *,
        scale: Tensor | None = None,
        zero_point: Tensor | None = None,
        g_idx: Tensor | None = None,
        scale_dtype: torch.dtype | None = None,
    ) -> QuantLinear:
        """Quantize a Linear (min-max qparams unless given) into a QuantLinear.

        ``scale_dtype`` defaults to the Linear's own dtype: compressed-tensors keeps scales in the dtype
        they were observed in (the model dtype) and transformers/vLLM readers load them as model-dtype
        parameters, so an fp32 model keeps fp32 scales and no precision is lost between what we
        evaluate and what we ship. Pass ``torch.float16`` explicitly to shrink an fp32 export.
        """
        w = linear.weight.detach()
        if scale_dtype is None:
            scale_dtype = scale_dtype_for(w.dtype)
        scheme.check_layer("linear", linear.in_features)
        packed = pack_weight(
            w, scheme, scale=scale, zero_point=zero_point, g_idx=g_idx, scale_dtype=scale_dtype
        )
        return cls.from_packed(packed, None if linear.bias is None else linear.bias.detach())

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: Tensor | None) -> QuantLinear:
        """Wrap existing checkpoint tensors (no copy of the integer data beyond ``copy_``)."""
        module = cls(
            packed.in_features,
            packed.out_features,
            packed.scheme,
            bias=bias is not None,
            has_g_idx=packed.weight_g_idx is not None,
            scale_dtype=packed.weight_scale.dtype,
            device=packed.weight_packed.device,
        )
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        with torch.no_grad():
            for name, t in packed.tensors("m").items():
                getattr(module, name.split(".", 1)[1]).copy_(t)
        return module

    def packed(self) -> PackedWeight:
        """The checkpoint tensors as a PackedWeight (shares storage with the buffers)."""
        return PackedWeight(
            self.weight_packed,
            self.weight_scale,
            self.weight_zero_point,
            self.weight_g_idx,
            self.weight_shape,
            self.scheme,
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense weight ``[out, in]`` a reader reconstructs."""
        return self.packed().dequantize(dtype)

    def reference_weight(self, input_dtype: torch.dtype) -> Tensor:
        """The dense weight in the dtype the reference op multiplies inputs of ``input_dtype`` in."""
        probe = torch.empty(0, dtype=input_dtype, device=self.weight_packed.device)
        return self.dequantized_weight(compute_dtype(probe))

    def hold_dense_weight(self, dtype: torch.dtype) -> None:
        """Keep the dequantized weight (in the reference path's compute dtype for inputs of ``dtype``) until
        ``drop_dense_weight``: the block sweep runs each freshly quantized layer on every calibration batch
        of the later groups and of the propagation, and unpacking the codes on each of those forwards was a
        quarter of GPTQ's time. The result is bit-identical to the reference op (same dequantize, same
        matmul); the cache is a plain attribute, never part of the state dict or the checkpoint."""
        self._dense_cache = self.reference_weight(dtype)

    def drop_dense_weight(self) -> None:
        self._dense_cache = None

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise CompressError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        cached = self._dense_cache
        if cached is not None and self.kernel is None and cached.dtype == compute_dtype(x) \
                and cached.device == x.device:
            bias = None if self.bias is None else self.bias.to(cached.dtype)
            return F.linear(x.to(cached.dtype), cached, bias).to(x.dtype)
        if self.kernel is not None:
            return self.kernel.forward(self, x)
        s = self.scheme
        return dequant_matmul_op(
            x,
            self.weight_packed,
            self.weight_scale,
            self.weight_zero_point,
            self.weight_g_idx,
            s.bits,
            s.group_size,
            s.symmetric,
            self.out_features,
            self.in_features,
            self.bias,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.tag}, "
            f"bias={self.bias is not None}"
        )

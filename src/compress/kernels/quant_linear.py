"""QuantLinear: an ``nn.Linear`` replacement whose ``state_dict()`` IS the checkpoint layer.

The module holds one typed storage (``core/storage.py``: ``PackedWeight`` for pack-quantized,
``UnpackedWeight`` for int8/FP8 codes) as buffers named like its fields, which are the checkpoint names
(``weight_packed``, ``weight_scale``, ``weight_zero_point`` only when asymmetric, ``weight_g_idx`` only
with activation ordering, ``weight_shape``; or ``weight``, ``weight_scale``, ...). So exporting is
``model.state_dict()`` and loading is ``load_state_dict`` into modules built with ``__init__``.
``storage()`` hands the same tensors back as the typed object the kernels compute from (no copy, no
scheme rebuilt); ``format`` names the codec that wrote them (``compress.codecs``). The forward goes
through the layer's kernel path (``kernels/paths.py``) and never branches on the device. A scheme with
input activations (W8A8-int8, W8A8-FP8) has its input quantized first (per token, or with the layer's stored
static ``input_scale``), unless the path does it itself (``kernels/int8_act.py``, ``kernels/fp8_act.py``).

Low-rank compensation (``set_lowrank``, EoRA): optional factors ``lora_A [r, in]`` and ``lora_B [out, r]`` in
the scales' dtype, added as ``y = Ŵx + B(Ax)`` after whichever path computed ``Ŵx``, on the unquantized
input. They are buffers, so ``.to`` moves them and the sweep's resume checkpoint (``block.state_dict()``)
keeps them, and a module built without them accepts them from a state dict; the exporter writes them to a
PEFT adapter beside the checkpoint, never among the codec's tensors (``compress.export.adapter``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.core.errors import CompressError
from compress.core.packing import PackedWeight, pack_weight, scale_dtype_for
from compress.core.scheme import QuantScheme
from compress.core.storage import WeightStorage
from compress.kernels.int8_act import fake_quantize_input
from compress.kernels.llm_int8 import llm_int8_input
from compress.kernels.ops import dequant_matmul
from compress.kernels.reference import compute_dtype

PACKED_FORMAT = "pack-quantized"
LOWRANK_LEAVES = ("lora_A", "lora_B")
"""State-dict leaves of the compensation factors (PEFT's names, without its ``.weight``)."""


class QuantLinear(nn.Module):
    """A Linear layer stored as quantized codes plus scales, in one codec's layout."""

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
        layout: type[WeightStorage] = PackedWeight,
        format: str = PACKED_FORMAT,
    ) -> None:
        """Allocate zeroed buffers of the checkpoint shapes, ready for ``load_state_dict``."""
        super().__init__()
        scheme.validate()
        self.kernel = None  # a compress.kernels.paths.KernelPath chosen at load; None = the reference path
        self._dense_cache: Tensor | None = None  # see hold_dense_weight
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.layout = layout
        self.format = format
        empty = layout.empty(out_features, in_features, scheme, scale_dtype=scale_dtype, has_g_idx=has_g_idx,
                             device=device)
        self._fields = layout.TENSOR_FIELDS
        for name in self._fields:
            tensor = getattr(empty, name)
            if tensor is None:
                setattr(self, name, None)
            else:
                self.register_buffer(name, tensor, persistent=name in layout.PERSISTENT)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=scale_dtype, device=device)) if bias else None
        )
        self.lora_A: Tensor | None = None
        self.lora_B: Tensor | None = None
        self.outlier_threshold: float | None = None
        """LLM.int8(): with int8 weight-only codes, inputs run through the outlier decomposition
        (``kernels/llm_int8.py``) before the weight path multiplies them; None: inputs as given."""

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
        """Quantize a Linear (min-max qparams unless given) into a pack-quantized QuantLinear (other layouts:
        ``compress.codecs.quantize_linear``).

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
        """Wrap pack-quantized checkpoint tensors (no copy of the integer data beyond ``copy_``)."""
        return cls.from_storage(packed, bias)

    @classmethod
    def from_storage(cls, storage: WeightStorage, bias: Tensor | None, format: str = PACKED_FORMAT) -> QuantLinear:
        """A module holding copies of ``storage``'s tensors; ``format`` names the codec that wrote them."""
        module = cls(
            storage.in_features,
            storage.out_features,
            storage.scheme,
            bias=bias is not None,
            has_g_idx=getattr(storage, "weight_g_idx", None) is not None,
            scale_dtype=storage.scale_dtype,
            device=storage.device,
            layout=type(storage),
            format=format,
        )
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        with torch.no_grad():
            for name, t in storage.named_tensors().items():
                getattr(module, name).copy_(t)
        return module

    def storage(self) -> WeightStorage:
        """The checkpoint tensors as the layout's typed storage (shares the buffers; built, not validated)."""
        return self.layout(scheme=self.scheme, **{n: getattr(self, n) for n in self._fields})

    def packed(self) -> PackedWeight:
        """The pack-quantized storage; CompressError for a layer in another layout."""
        storage = self.storage()
        if not isinstance(storage, PackedWeight):
            raise CompressError(f"layer stored as {self.format} has no pack-quantized tensors")
        return storage

    # ---- low-rank compensation ------------------------------------------------------------------------
    @property
    def lowrank_rank(self) -> int | None:
        """The rank of the compensation factors; None without them."""
        return None if self.lora_A is None else int(self.lora_A.shape[0])

    def set_lowrank(self, a: Tensor | None, b: Tensor | None) -> None:
        """Attach (or, with ``None``, remove) factors ``a [r, in]``, ``b [out, r]``: kept in the scales' dtype."""
        if a is None or b is None:
            self._buffers.pop("lora_A", None)
            self._buffers.pop("lora_B", None)
            self.lora_A = self.lora_B = None
            return
        rank = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or tuple(a.shape) != (rank, self.in_features) \
                or tuple(b.shape) != (self.out_features, rank) or rank == 0:
            raise CompressError(f"low-rank factors of shapes {list(a.shape)} and {list(b.shape)} do not fit a "
                                f"{self.out_features}x{self.in_features} layer")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise CompressError("low-rank factors must be floating point")
        dtype = self.weight_scale.dtype if self.weight_scale.is_floating_point() else torch.float32
        device = self.weight_scale.device
        for name in LOWRANK_LEAVES:
            self._buffers.pop(name, None)
        self.__dict__.pop("lora_A", None)
        self.__dict__.pop("lora_B", None)
        self.register_buffer("lora_A", a.detach().to(device=device, dtype=dtype).contiguous())
        self.register_buffer("lora_B", b.detach().to(device=device, dtype=dtype).contiguous())

    def lowrank_weight(self, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """``B A`` ``[out, in]`` (None without factors)."""
        if self.lora_A is None or self.lora_B is None:
            return None
        return self.lora_B.to(dtype) @ self.lora_A.to(dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A module built without factors takes them from a state dict that has them (resume, ``load``)."""
        a, b = state_dict.get(prefix + "lora_A"), state_dict.get(prefix + "lora_B")
        if a is not None and b is not None and self.lora_A is None:
            self.set_lowrank(a, b)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _compensate(self, x: Tensor, y: Tensor) -> Tensor:
        if self.lora_A is None or self.lora_B is None:
            return y
        dtype = compute_dtype(x)
        low = F.linear(F.linear(x.to(dtype), self.lora_A.to(dtype)), self.lora_B.to(dtype))
        return (y.to(dtype) + low).to(y.dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense weight ``[out, in]`` a reader reconstructs."""
        return self.storage().dequantize(dtype)

    def reference_weight(self, input_dtype: torch.dtype) -> Tensor:
        """The dense weight in the dtype the reference op multiplies inputs of ``input_dtype`` in."""
        probe = torch.empty(0, dtype=input_dtype, device=self.weight_scale.device)
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

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the codes; a dtype cast (``.half()``, ``.to(bfloat16)``) must not touch them:
        FP8 codes are floating point to torch but are data, not activations. Only the bias follows."""
        codes = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == torch.float8_e4m3fn}
        result = super()._apply(fn, recurse)
        for name, before in codes.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(device=after.device)
        return result

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise CompressError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        return self._compensate(x, self._quantized_forward(x))

    def _quantized_forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise CompressError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        acts = self.scheme.input_activations
        if acts is not None and not getattr(self.kernel, "quantizes_inputs", False):
            # W8A8: every path computes on the quantized input (per token, or with the stored static scale)
            x = fake_quantize_input(x, acts) if acts.dynamic else fake_quantize_input(x, acts, self.input_scale)
        elif self.outlier_threshold is not None:  # LLM.int8(): outlier columns exact, the rest int8 per token
            x = llm_int8_input(x, self.outlier_threshold)
        cached = self._dense_cache
        if cached is not None and self.kernel is None and cached.dtype == compute_dtype(x) \
                and cached.device == x.device:
            bias = None if self.bias is None else self.bias.to(cached.dtype)
            return F.linear(x.to(cached.dtype), cached, bias).to(x.dtype)
        if self.kernel is not None:
            return self.kernel.forward(self, x)
        return dequant_matmul(x, self.storage(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.tag}, "
            f"format={self.format}, bias={self.bias is not None}"
            + ("" if self.lora_A is None else f", lowrank={self.lowrank_rank}")
            + ("" if self.outlier_threshold is None else f", llm_int8_threshold={self.outlier_threshold:g}")
        )

"""Minimal reproduction, ready for an upstream report: GPTQModel 7.7's ``TorchFusedLinear`` on CPU ignores the
zero points of an asymmetric GPTQ layer, so asymmetric checkpoints give wrong outputs there, silently.

    .venv-readers/gptqmodel/bin/python benchmarks/repro_gptqmodel_fused_cpu_asym.py

(any python with gptqmodel installed; ``bash .ci/install-gptqmodel`` builds that venv). Nothing of ours is
imported: one 4-bit group-128 layer (128 in, 64 out) with random codes, zero points and fp16 scales, packed in
the GPTQ layout (``qweight`` [in/8, out], ``qzeros`` [groups, out/8], ``scales`` [groups, out], trivial
``g_idx``, zeros stored as is, i.e. v2 as the kernels use it after load), is put into ``TorchLinear`` and into
``TorchFusedLinear``; both outputs are compared with ``x @ ((q - z) * s)``.

What happens: ``TorchLinear`` matches (fp16 rounding); ``TorchFusedLinear`` matches only when every zero point is
8 (symmetric) and is off by the size of the output otherwise. Cause: ``TorchFusedLinear.transform_cpu`` sets
``self.qzeros = torch.zeros_like(self.scales)`` and passes these zeros to ``aten._weight_int4pack_mm_for_cpu``,
which computes ``(q - 8) * scale + zero``: right for symmetric layers, wrong for any other zero point although
the class declares ``SUPPORTS_SYM = [True, False]``. ``GPTQModel.load(..., device="cpu", dtype=torch.float32)``
auto-selects this kernel for 4-bit layers (fp16 selects ``TorchAtenLinear``, bf16 ``TorchCpuAvx512Linear`` on
AVX512-BF16 CPUs; both are right), so an asymmetric 4-bit GPTQ checkpoint loaded in fp32 on CPU gives wrong
logits with no warning. tests/export/test_interop_gptqmodel.py keeps that read as a strict expected failure.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # TorchLinear would torch.compile its dequantizer (slow, same math)

import gptqmodel  # noqa: E402
import torch  # noqa: E402
from gptqmodel.nn_modules.qlinear.torch import TorchLinear  # noqa: E402
from gptqmodel.nn_modules.qlinear.torch_fused import TorchFusedLinear  # noqa: E402

IN, OUT, GROUP, BITS = 128, 64, 128, 4


def pack_rows(u: torch.Tensor) -> torch.Tensor:
    """[rows, cols] 4-bit codes -> int32 [rows/8, cols], 8 codes per word along dim 0, LSB first."""
    u = u.to(torch.int64).reshape(u.shape[0] // 8, 8, u.shape[1])
    words = sum(u[:, j] << (4 * j) for j in range(8))
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def run(sym: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    groups = IN // GROUP
    q = torch.randint(0, 16, (IN, OUT), generator=gen)
    z = torch.full((groups, OUT), 8) if sym else torch.randint(0, 16, (groups, OUT), generator=gen)
    s = (torch.rand(groups, OUT, generator=gen) * 0.01 + 0.005).half()
    g_idx = torch.arange(IN, dtype=torch.int32) // GROUP
    dense = ((q - z[g_idx]).float() * s.float()[g_idx])  # [in, out]
    x = torch.randn(4, IN, generator=gen)
    expected = x @ dense
    for cls, dtype in ((TorchLinear, torch.float16), (TorchFusedLinear, torch.float32)):
        layer = cls(bits=BITS, group_size=GROUP, sym=sym, desc_act=False, in_features=IN, out_features=OUT,
                    bias=False, pack_dtype=torch.int32)
        layer.qweight = pack_rows(q)
        layer.qzeros = pack_rows(z.t()).t().contiguous()  # [groups, out/8]
        layer.scales = s
        layer.g_idx = g_idx
        if hasattr(layer, "qzero_format"):
            layer.qzero_format(format=2)
        layer.post_init()
        layer.eval()
        with torch.no_grad():
            out = layer(x.to(dtype)).float()
        err = float((out - expected).abs().max())
        print(f"{'sym ' if sym else 'asym'} {cls.__name__:17s} max |out - x @ ((q - z) * s)| = {err:.4f} "
              f"(max |expected| {float(expected.abs().max()):.3f})")


if __name__ == "__main__":
    print(f"gptqmodel {gptqmodel.__version__}, torch {torch.__version__}")
    run(sym=True)
    run(sym=False)

"""Per-layer calibration statistics, accumulated batch by batch from a layer's inputs.

The pipeline owns the hooks; a pass owns the solve. Between them sits one of these accumulators: the
pipeline calls ``add_batch(x)`` with every calibration batch's layer input, the pass reads the result in
``apply`` and the pipeline calls ``free()`` afterwards so at most one block's worth of Hessians is alive.

``HessianStats`` keeps what every second-order method needs (GPTQ, SparseGPT: ``H = 2/n Σ x xᵀ``) and,
because it costs one extra vector, what Wanda needs (``sq_norms``: per-input-channel ``Σ x²``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from compress.core.errors import CompressError


class HessianStats:
    """Running ``H = 2/n Σ_t x_t x_tᵀ`` over all ``n`` calibration tokens, in float32.

    The average is kept *normalised* at every step (``H ← H·n/(n+m) + (2/(n+m)) XᵀX``, with ``X`` scaled
    by ``sqrt(2/(n+m))`` before the product) instead of summing raw outer products and dividing at the
    end: the entries then stay at the scale of one token's ``x xᵀ`` however many batches arrive, so a
    long calibration run neither overflows nor loses small contributions to a huge running sum. This is
    the accumulation of the reference GPTQ implementation.

    Storage is allocated lazily on the device of the first batch (or on ``device`` when given), so the
    pipeline can create one per layer before it knows where the block will run.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        if in_features <= 0:
            raise CompressError(f"a Hessian needs a positive input width, got {in_features}")
        self.in_features = in_features
        self.device = None if device is None else torch.device(device)
        self.tokens = 0
        self._hessian: Tensor | None = None
        self._sq_norms: Tensor | None = None
        self._freed = False

    def _allocate(self, device: torch.device) -> None:
        k = self.in_features
        self._hessian = torch.zeros(k, k, dtype=torch.float32, device=device)
        self._sq_norms = torch.zeros(k, dtype=torch.float32, device=device)

    def add_batch(self, x: Tensor) -> None:
        """Fold one batch of layer inputs (``[..., in_features]``, any float dtype) into the average."""
        if self._freed:
            raise CompressError("these calibration statistics were already freed")
        if x.shape[-1] != self.in_features:
            raise CompressError(f"input has {x.shape[-1]} features, statistics expect {self.in_features}")
        x = x.detach().reshape(-1, self.in_features)
        m = x.shape[0]
        if m == 0:
            return
        if self._hessian is None:
            self._allocate(self.device if self.device is not None else x.device)
        assert self._hessian is not None and self._sq_norms is not None
        x = x.to(device=self._hessian.device, dtype=torch.float32)
        total = self.tokens + m
        self._hessian.mul_(self.tokens / total)
        xs = x * math.sqrt(2.0 / total)
        # H is symmetric: only its upper block rows are accumulated (H[i:, i:] rows of width k - i), which
        # skips about a third of the products for wide layers; ``hessian`` mirrors the upper triangle
        width = self._block_width()
        for start in range(0, self.in_features, width):
            self._hessian[start:start + width, start:].addmm_(xs[:, start:start + width].t(), xs[:, start:])
        self._sq_norms.add_(x.square().sum(dim=0))
        self.tokens = total

    def _block_width(self) -> int:
        """Columns per block row of the triangular accumulation: at least 256 (narrower blocks lose more to
        small-matrix overheads than the triangle saves), at most 8 block rows."""
        blocks = max(1, min(8, self.in_features // 256))
        return -(-self.in_features // blocks)

    @property
    def hessian(self) -> Tensor:
        """``2/n Σ x xᵀ``, float32 ``[in, in]`` (zeros before any batch)."""
        if self._freed:
            raise CompressError("these calibration statistics were already freed")
        if self._hessian is None:
            self._allocate(self.device if self.device is not None else torch.device("cpu"))
        assert self._hessian is not None
        if self._block_width() < self.in_features:  # mirror the accumulated upper triangle (exactly symmetric)
            upper = torch.triu(self._hessian)
            self._hessian.copy_(upper + torch.triu(self._hessian, diagonal=1).t())
        return self._hessian

    @property
    def sq_norms(self) -> Tensor:
        """Per-input-channel ``Σ_t x_t[j]²`` (float32 ``[in]``); ``sqrt`` of it is Wanda's ``‖X_j‖₂``."""
        if self._freed:
            raise CompressError("these calibration statistics were already freed")
        if self._sq_norms is None:
            self._allocate(self.device if self.device is not None else torch.device("cpu"))
        assert self._sq_norms is not None
        return self._sq_norms

    def share_key(self) -> tuple:
        """Accumulators with equal keys fed the same inputs hold the same numbers, so layers that read one
        tensor (q/k/v, gate/up) may share one: the sweep then computes each Hessian once per group."""
        return (type(self), self.in_features, self.device)

    def free(self) -> None:
        """Drop the tensors (the Hessian is ``in²`` floats per layer); ``tokens`` stays for reports."""
        self._hessian = None
        self._sq_norms = None
        self._freed = True


class InputNormStats:
    """Per-input-channel ``Σ_t x_t[j]²`` only: what Wanda needs, ``in`` floats instead of ``in²``."""

    def __init__(self, in_features: int) -> None:
        if in_features <= 0:
            raise CompressError(f"input norms need a positive input width, got {in_features}")
        self.in_features = in_features
        self.tokens = 0
        self._sq_norms: Tensor | None = None

    def add_batch(self, x: Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise CompressError(f"input has {x.shape[-1]} features, statistics expect {self.in_features}")
        x = x.detach().reshape(-1, self.in_features).to(torch.float32)
        if self._sq_norms is None:
            self._sq_norms = torch.zeros(self.in_features, dtype=torch.float32, device=x.device)
        self._sq_norms.add_(x.square().sum(dim=0).to(self._sq_norms.device))
        self.tokens += x.shape[0]

    @property
    def sq_norms(self) -> Tensor:
        if self._sq_norms is None:
            return torch.zeros(self.in_features, dtype=torch.float32)
        return self._sq_norms

    def free(self) -> None:
        self._sq_norms = None

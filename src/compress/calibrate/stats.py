"""Per-layer calibration statistics, accumulated batch by batch from a layer's inputs.

The pipeline owns the hooks; a pass owns the solve. Between them sits one of these accumulators: the
pipeline calls ``add_batch(x)`` with every calibration batch's layer input, the pass reads the result in
``apply`` and the pipeline calls ``free()`` afterwards so at most one block's worth of Hessians is alive.

``HessianStats`` keeps what every second-order method needs (GPTQ, SparseGPT: ``H = 2/n Σ x xᵀ``) and,
because it costs one extra vector, what Wanda needs (``sq_norms``: per-input-channel ``Σ x²``).
"""

from __future__ import annotations

import math
import os
import time

import torch
from torch import Tensor

from compress.core.errors import CompressError

HESSIAN_DTYPE_ENV = "COMPRESS_HESSIAN_DTYPE"
"""``float32`` (exact products), ``bfloat16`` (products of bfloat16-rounded inputs, accumulated in float32)
or ``auto`` (the default: bfloat16 where this CPU multiplies it natively and clearly faster, else float32)."""
_PRODUCT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_probed: dict[str, torch.dtype] = {}
_DEFAULT = "float32"  # "auto" (bfloat16 where native) once its KL is measured beside the peer on wider models


def product_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the ``XᵀX`` products for inputs on ``device``.

    The Hessian products are the largest single cost of GPTQ on a CPU after the block forwards (an
    ``[n, k]ᵀ[n, k]`` matmul per batch and layer). CPUs with native bfloat16 dot products (AVX512-BF16,
    AMX) run them ~2x faster with bfloat16 inputs; each input then carries a relative rounding of at most
    2⁻⁹ and each batch's product one more before it is added to the float32 running mean, errors far below
    GPTQ's 1% damping: on the demo model the W4/W3 KL moved by < 0.5% (0.01606 → 0.01603, 0.0642 →
    0.0640), within run-to-run noise. Where bfloat16 is emulated (older CPUs: 10x slower) a one-off timing
    probe keeps float32; accelerators keep float32 (there the products are cheap). ``COMPRESS_HESSIAN_DTYPE``
    forces either."""
    asked = os.environ.get(HESSIAN_DTYPE_ENV, _DEFAULT).strip().lower()
    if asked in _PRODUCT_DTYPES:
        return _PRODUCT_DTYPES[asked]
    if asked != "auto":
        raise CompressError(f"{HESSIAN_DTYPE_ENV}={asked!r} is not one of auto, float32, bfloat16")
    if device.type != "cpu":
        return torch.float32
    if "cpu" not in _probed:
        _probed["cpu"] = _probe_cpu()
    return _probed["cpu"]


def _probe_cpu(tokens: int = 2048, width: int = 512, repeats: int = 3) -> torch.dtype:
    """bfloat16 when it multiplies at least 1.5x faster than float32 here (best of ``repeats``)."""
    x = torch.randn(tokens, width)

    def best(t: Tensor) -> float:
        times = []
        for _ in range(repeats + 1):  # the first run warms up the kernel
            start = time.perf_counter()
            t.t() @ t
            times.append(time.perf_counter() - start)
        return min(times[1:])

    return torch.bfloat16 if best(x.bfloat16()) * 1.5 <= best(x) else torch.float32


def _input_rows(x: Tensor, in_features: int, freed: bool = False) -> Tensor:
    """One batch of layer inputs ``[..., in_features]`` as rows ``[tokens, in_features]`` (detached), after
    the checks every accumulator makes: not freed, and the width it was made for."""
    if freed:
        raise CompressError("these calibration statistics were already freed")
    if x.shape[-1] != in_features:
        raise CompressError(f"input has {x.shape[-1]} features, statistics expect {in_features}")
    return x.detach().reshape(-1, in_features)


class HessianStats:
    """Running ``H = 2/n Σ_t x_t x_tᵀ`` over all ``n`` calibration tokens, in float32 (see ``product_dtype``
    for the dtype of each batch's product).

    The average is kept *normalised* at every step (``H ← H·n/(n+m) + (2/(n+m)) XᵀX``, with ``X`` scaled
    by ``sqrt(2/(n+m))`` before the product) instead of summing raw outer products and dividing at the
    end: the entries then stay at the scale of one token's ``x xᵀ`` however many batches arrive, so a
    long calibration run neither overflows nor loses small contributions to a huge running sum. This is
    the accumulation of the reference GPTQ implementation.

    Storage is allocated lazily on the device of the first batch (or on ``device`` when given), so the
    pipeline can create one per layer before it knows where the block will run.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None,
                 product_dtype: torch.dtype | None = None) -> None:
        if in_features <= 0:
            raise CompressError(f"a Hessian needs a positive input width, got {in_features}")
        self.in_features = in_features
        self.product_dtype = product_dtype
        """dtype of the per-batch ``XᵀX`` products (``None``: ``product_dtype(device)`` at the first batch)."""
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
        x = _input_rows(x, self.in_features, self._freed)
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
        if self.product_dtype is None:
            self.product_dtype = product_dtype(self._hessian.device)
        if self.product_dtype == torch.float32:
            for start in range(0, self.in_features, width):
                self._hessian[start:start + width, start:].addmm_(xs[:, start:start + width].t(), xs[:, start:])
        else:
            low = xs.to(self.product_dtype)
            for start in range(0, self.in_features, width):
                self._hessian[start:start + width, start:].add_(low[:, start:start + width].t() @ low[:, start:])
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
        return (type(self), self.in_features, self.device, self.product_dtype)

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
        x = _input_rows(x, self.in_features).to(torch.float32)
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


class InputSampleStats:
    """Mean ``|x|`` per input channel over every calibration token, plus a bounded uniform sample of input
    rows: what a scale search (AWQ) needs to score candidates by the layer's output error, not only its
    Hessian.

    The sample is a bottom-k reservoir: every incoming row draws a key from a generator seeded with
    ``seed``, and the ``max_rows`` rows with the smallest keys are kept. That is a uniform sample without
    replacement of all rows seen so far, whatever the batch sizes, and the same inputs in the same order
    give the same sample (ties in keys are broken by arrival order). Memory is bounded by ``max_rows ×
    in_features`` values, kept in the input's dtype (a bfloat16 model stores half of what float32 would).
    Storage lives on the device of the first batch, like ``HessianStats``.
    """

    def __init__(self, in_features: int, max_rows: int = 4096, seed: int = 0) -> None:
        if in_features <= 0:
            raise CompressError(f"input statistics need a positive input width, got {in_features}")
        if max_rows <= 0:
            raise CompressError(f"the input sample needs room for at least one row, got {max_rows}")
        self.in_features = in_features
        self.max_rows = max_rows
        self.seed = seed
        self.tokens = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._abs_sum: Tensor | None = None
        self._rows: Tensor | None = None
        self._keys: Tensor | None = None  # float64 on the CPU, one per kept row
        self._freed = False

    def add_batch(self, x: Tensor) -> None:
        x = _input_rows(x, self.in_features, self._freed)
        m = x.shape[0]
        if m == 0:
            return
        if self._abs_sum is None:
            self._abs_sum = torch.zeros(self.in_features, dtype=torch.float64, device=x.device)
        self._abs_sum.add_(x.abs().sum(dim=0, dtype=torch.float64).to(self._abs_sum.device))
        keys = torch.rand(m, generator=self._generator, dtype=torch.float64)
        rows = x.to(self._abs_sum.device)
        if self._rows is not None:
            assert self._keys is not None
            keys, rows = torch.cat([self._keys, keys]), torch.cat([self._rows, rows])
        if keys.shape[0] > self.max_rows:
            keep = torch.sort(keys, stable=True).indices[: self.max_rows]
            keep = torch.sort(keep).values  # kept rows stay in arrival order
            keys, rows = keys[keep], rows[keep.to(rows.device)]
        self._keys, self._rows = keys, rows.clone() if self._rows is None else rows
        self.tokens += m

    @property
    def mean_abs(self) -> Tensor:
        """Mean ``|x_j|`` over every token seen (float32 ``[in]``; zeros before any batch)."""
        self._check()
        if self._abs_sum is None or self.tokens == 0:
            return torch.zeros(self.in_features, dtype=torch.float32)
        return (self._abs_sum / self.tokens).to(torch.float32)

    @property
    def rows(self) -> Tensor:
        """The sampled input rows ``[min(tokens, max_rows), in]`` in the input's dtype, in arrival order."""
        self._check()
        if self._rows is None:
            return torch.zeros(0, self.in_features, dtype=torch.float32)
        return self._rows

    def _check(self) -> None:
        if self._freed:
            raise CompressError("these calibration statistics were already freed")

    def share_key(self) -> tuple:
        """Layers reading one tensor may share one sample (same seed and size: the same numbers)."""
        return (type(self), self.in_features, self.max_rows, self.seed)

    def free(self) -> None:
        self._abs_sum = self._rows = self._keys = None
        self._freed = True


class InputAbsMaxStats:
    """Per-input-channel ``max_t |x_t[j]|`` over every calibration token (what SmoothQuant's scales read),
    plus, when ``max_rows > 0``, the bounded seeded row sample of ``InputSampleStats`` (what a search that
    scores candidates by the output error needs). ``in`` floats, plus the sample."""

    def __init__(self, in_features: int, max_rows: int = 0, seed: int = 0) -> None:
        if in_features <= 0:
            raise CompressError(f"input statistics need a positive input width, got {in_features}")
        if max_rows < 0:
            raise CompressError(f"the input sample size must be 0 (none) or positive, got {max_rows}")
        self.in_features = in_features
        self.max_rows = max_rows
        self.seed = seed
        self.tokens = 0
        self._abs_max: Tensor | None = None
        self._sample = InputSampleStats(in_features, max_rows, seed) if max_rows else None
        self._freed = False

    def add_batch(self, x: Tensor) -> None:
        x = _input_rows(x, self.in_features, self._freed)
        if x.shape[0] == 0:
            return
        batch_max = x.abs().amax(dim=0).to(torch.float32)
        if self._abs_max is None:
            self._abs_max = torch.zeros(self.in_features, dtype=torch.float32, device=x.device)
        torch.maximum(self._abs_max, batch_max.to(self._abs_max.device), out=self._abs_max)
        if self._sample is not None:
            self._sample.add_batch(x)
        self.tokens += x.shape[0]

    @property
    def abs_max(self) -> Tensor:
        """``max |x_j|`` over every token seen (float32 ``[in]``; zeros before any batch)."""
        if self._freed:
            raise CompressError("these calibration statistics were already freed")
        if self._abs_max is None:
            return torch.zeros(self.in_features, dtype=torch.float32)
        return self._abs_max

    @property
    def rows(self) -> Tensor:
        """The sampled input rows (``InputSampleStats.rows``); ``[0, in]`` when no sample is kept."""
        if self._freed:
            raise CompressError("these calibration statistics were already freed")
        if self._sample is None:
            return torch.zeros(0, self.in_features, dtype=torch.float32)
        return self._sample.rows

    def share_key(self) -> tuple:
        """Layers reading one tensor may share one accumulator (same sample size and seed: same numbers)."""
        return (type(self), self.in_features, self.max_rows, self.seed)

    def free(self) -> None:
        if self._sample is not None:
            self._sample.free()
        self._abs_max = None
        self._freed = True

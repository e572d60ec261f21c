"""Orthogonal matrices for rotating a model (QuaRot, SpinQuant): Hadamard constructions and a seeded fallback.

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H Hᵀ = n I``, so ``H / √n`` is orthogonal and
spreads every coordinate evenly over all others (what flattens outlier channels before quantization).
Orders built here, all in float64:

- ``2^k``: Sylvester (``[[H, H], [H, -H]]``);
- ``q + 1`` for a prime ``q ≡ 3 (mod 4)`` (12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, ...): Paley I;
- ``2(q + 1)`` for a prime ``q ≡ 1 (mod 4)`` (12, 28, 36, 60, 76, 108, ...): Paley II;
- ``2^k · m`` for any ``m`` above: the Kronecker product ``H_{2^k} ⊗ H_m`` (768 = 64·12, 896 = 32·28,
  3584 = 128·28, 5120 = 256·20).

Where no construction is known here (an order that is not a multiple of 4, or one like 4·47 = 188 this
table lacks), ``orthogonal(n, seed)`` falls back to a seeded random orthogonal matrix (QR of a Gaussian,
signs fixed so the result is unique), which is exact as a rotation but spreads outliers less evenly.

The randomized Hadamard of QuaRot is ``diag(s) · H / √n`` with seeded signs ``s ∈ {±1}``: orthogonal, and
different per seed. Pure functions of their arguments (the seed included), on the CPU generator, so the
same seed gives the same matrix on every machine.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["hadamard", "hadamard_kind", "orthogonal", "random_orthogonal", "randomized_hadamard"]


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(q**0.5) + 1))


def _sylvester(n: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> Tensor:
    """``Q[i, j] = χ(j - i)``, χ the quadratic character mod the prime ``q``."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    index = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[index]


def _paley1(q: int) -> Tensor:
    """Order ``q + 1``, ``q ≡ 3 (mod 4)`` prime: ``I + S`` with ``S = [[0, 1ᵀ], [-1, Q]]`` skew-symmetric."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> Tensor:
    """Order ``2(q + 1)``, ``q ≡ 1 (mod 4)`` prime: ``C = [[0, 1ᵀ], [1, Q]]`` symmetric, each 0 replaced by
    ``[[1, -1], [-1, -1]]`` and each ±1 by ``±[[1, 1], [1, -1]]``."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def _small(m: int) -> Tensor | None:
    """A Hadamard matrix of order ``m`` from one Paley construction, or None."""
    if m in (1, 2):
        return _sylvester(m)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


def _plan(n: int) -> tuple[int, int] | None:
    """``(2^k, m)`` with ``n = 2^k · m`` and a construction for ``m`` (the largest power of two first)."""
    if n < 1:
        return None
    power = n & -n
    while power >= 1:
        m = n // power
        if _small(m) is not None:
            return power, m
        power //= 2
    return None


@lru_cache(maxsize=16)
def _hadamard_cached(n: int) -> Tensor | None:
    plan = _plan(n)
    if plan is None:
        return None
    power, m = plan
    h = torch.kron(_sylvester(power), _small(m)) if m > 1 else _sylvester(power)
    return h


def hadamard(n: int) -> Tensor | None:
    """A ±1 Hadamard matrix of order ``n`` (float64, ``H Hᵀ = n I``), or None when none is built here."""
    h = _hadamard_cached(n)
    return None if h is None else h.clone()


def hadamard_kind(n: int) -> str:
    """How ``orthogonal(n)`` is built: ``hadamard``, ``hadamard-<2^k>x<m>`` or ``random-orthogonal``."""
    plan = _plan(n)
    if plan is None:
        return "random-orthogonal"
    power, m = plan
    return "hadamard" if m == 1 else f"hadamard-{power}x{m}"


def random_orthogonal(n: int, seed: int) -> Tensor:
    """A seeded random orthogonal matrix (float64): QR of a Gaussian, columns' signs fixed by R's diagonal."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(1, dtype=torch.float64))


def orthogonal(n: int, seed: int | None = None) -> Tensor:
    """The normalised Hadamard ``H / √n`` of order ``n``; where none is built, a random orthogonal matrix
    (seeded by ``seed``, 0 when None)."""
    h = hadamard(n)
    if h is None:
        return random_orthogonal(n, 0 if seed is None else seed)
    return h / n**0.5


def randomized_hadamard(n: int, seed: int) -> Tensor:
    """QuaRot's randomized Hadamard ``diag(s) · H / √n``, signs ``s`` drawn from ``seed`` (float64,
    orthogonal). Without a Hadamard of order ``n``: ``random_orthogonal(n, seed)``."""
    h = hadamard(n)
    if h is None:
        return random_orthogonal(n, seed)
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return signs[:, None] * h / n**0.5

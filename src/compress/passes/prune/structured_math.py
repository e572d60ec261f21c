"""Structured pruning as pure tensor functions: calibrated importance, what to keep, sliced ``nn.Linear``s.

Importance is the energy a unit adds to the residual stream on calibration tokens, not its weight norm:
an MLP channel ``j`` contributes ``x_j · W_down[:, j]``, so its score is ``Σ_t x_{t,j}² · ‖W_down[:, j]‖²``
(a channel with big weights that never fires scores zero; a small column fed large activations scores high).
A head ``h`` contributes ``W_o[:, h] · a_h`` (``a_h`` its attention output), whose energy over the tokens is
exactly ``trace(W_o,h · G_h · W_o,hᵀ)`` with ``G_h = Σ_t a_{t,h} a_{t,h}ᵀ`` (a ``head_dim²`` Gram per head).
A block's score is ShortGPT's block influence: ``1 − mean_t cos(h_in, h_out)``, how much it changes its input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


class ChannelEnergy:
    """Σ x² per input feature of a layer (the MLP's down projection): a ``Stats`` the pipeline feeds.

    With ``full`` it keeps the whole Gram ``Σ xxᵀ`` (features², like GPTQ's Hessian of that layer), which
    the least-squares refit of the output projection needs; the energies are its diagonal.
    """

    def __init__(self, features: int, full: bool = False) -> None:
        shape = (features, features) if full else (features,)
        self._acc = torch.zeros(shape, dtype=torch.float64)
        self.full = full
        self.tokens = 0

    def add_batch(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self._acc += (flat.T @ flat if self.full else flat.square().sum(0)).double().cpu()
        self.tokens += flat.shape[0]

    @property
    def sum_sq(self) -> Tensor:
        return self._acc.diagonal() if self.full else self._acc

    @property
    def gram(self) -> Tensor | None:
        return self._acc if self.full else None

    def free(self) -> None:
        self._acc = torch.zeros(0, dtype=torch.float64)


class HeadGram:
    """Per-head Gram ``Σ_t a_h a_hᵀ`` of the attention output (the input of the output projection).

    With ``full`` it keeps the Gram of the whole input (all heads, cross terms included) for the refit.
    """

    def __init__(self, num_heads: int, head_dim: int, full: bool = False) -> None:
        self.num_heads, self.head_dim, self.full = num_heads, head_dim, full
        width = num_heads * head_dim
        shape = (width, width) if full else (num_heads, head_dim, head_dim)
        self._acc = torch.zeros(shape, dtype=torch.float64)
        self.tokens = 0

    def add_batch(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1, self.num_heads * self.head_dim).float()
        if self.full:
            self._acc += (flat.T @ flat).double().cpu()
        else:
            heads = flat.reshape(-1, self.num_heads, self.head_dim)  # [tokens, H, d]
            self._acc += torch.einsum("thi,thj->hij", heads, heads).double().cpu()
        self.tokens += flat.shape[0]

    @property
    def gram(self) -> Tensor:
        """The per-head blocks ``[H, d, d]``."""
        if not self.full:
            return self._acc
        d = self.head_dim
        return torch.stack([self._acc[h * d:(h + 1) * d, h * d:(h + 1) * d] for h in range(self.num_heads)])

    @property
    def full_gram(self) -> Tensor | None:
        return self._acc if self.full else None

    def free(self) -> None:
        self._acc = torch.zeros(0, dtype=torch.float64)


def refit(weight: Tensor, gram: Tensor, keep: Tensor, damp: float = 0.01) -> Tensor:
    """The output projection's weight on the kept inputs that best reproduces its old output, by least squares.

    Minimises ``Σ_t ‖W x_t − W' x_t[keep]‖²``: ``W' = W G[:, keep] (G[keep, keep] + λI)⁻¹`` with ``G = Σ xxᵀ``
    (the compensation OBS-style structured pruners apply), ``λ = damp × mean diagonal`` so that few tokens
    or collinear inputs cannot blow it up. Returned in the weight's dtype.
    """
    g = gram.double()
    kept = g.index_select(0, keep).index_select(1, keep)
    kept = kept + damp * kept.diagonal().mean().clamp_min(1e-12) * torch.eye(kept.shape[0], dtype=g.dtype)
    rhs = weight.detach().double().cpu() @ g.index_select(1, keep)  # [out, kept]
    solved = torch.linalg.solve(kept, rhs.T).T  # kept is symmetric
    return solved.to(weight.dtype)


class BlockChange:
    """Running mean of ``cos(h_in, h_out)`` over tokens for one block."""

    def __init__(self) -> None:
        self.cos_sum = 0.0
        self.tokens = 0

    def add(self, hidden_in: Tensor, hidden_out: Tensor) -> None:
        a = hidden_in.detach().reshape(-1, hidden_in.shape[-1]).float()
        b = hidden_out.detach().reshape(-1, hidden_out.shape[-1]).float()
        self.cos_sum += torch.nn.functional.cosine_similarity(a, b, dim=-1).double().sum().item()
        self.tokens += a.shape[0]

    def score(self) -> float:
        """1 − mean cosine: 0 for a block that passes its input through unchanged."""
        return 1.0 - self.cos_sum / max(self.tokens, 1)


def channel_scores(sum_sq: Tensor, down_weight: Tensor) -> Tensor:
    """Energy each intermediate channel adds to the output: ``Σ_t x_j² · ‖W_down[:, j]‖²``."""
    return sum_sq.double() * down_weight.detach().double().square().sum(0).cpu()


def head_scores(gram: Tensor, o_weight: Tensor, head_dim: int) -> Tensor:
    """Energy each query head adds to the output: ``trace(W_h G_h W_hᵀ)`` per head."""
    heads = gram.shape[0]
    w = o_weight.detach().double().cpu().reshape(o_weight.shape[0], heads, head_dim).permute(1, 0, 2)  # [H, out, d]
    return torch.einsum("hoi,hij,hoj->h", w, gram.double(), w)


def keep_top(scores: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` highest scores in ascending index order (ties: the lower index is kept)."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


@dataclass(frozen=True)
class HeadCut:
    """How heads are removed in every layer, so that the config stays uniform and GQA-consistent.

    ``per_group`` query heads leave every KV group (``num_key_value_heads`` unchanged), or ``groups`` whole KV
    groups leave with all their query heads. Exactly one of the two is non-zero.
    """

    per_group: int
    groups: int

    def removed_heads(self, num_heads: int, num_kv: int) -> int:
        """Query heads this cut removes from a layer of ``num_heads`` heads in ``num_kv`` groups."""
        return self.groups * (num_heads // num_kv) if self.groups else self.per_group * num_kv


def head_cuts(num_heads: int, num_kv: int) -> list[HeadCut]:
    """Every GQA-consistent cut that leaves at least one head, fewest heads removed first."""
    group = num_heads // num_kv
    cuts = [HeadCut(per_group=r, groups=0) for r in range(1, group)]
    cuts += [HeadCut(per_group=0, groups=k) for k in range(1, num_kv)]
    return sorted(cuts, key=lambda c: (c.removed_heads(num_heads, num_kv), c.groups))


def choose_heads(scores: Tensor, num_kv: int, cut: HeadCut) -> tuple[Tensor, Tensor]:
    """(query heads kept, KV heads kept) for one layer; query head ``h`` reads KV head ``h // group``."""
    num_heads = scores.numel()
    group = num_heads // num_kv
    by_group = scores.double().reshape(num_kv, group)
    if cut.groups:
        kv_keep = keep_top(by_group.sum(1), num_kv - cut.groups)
        q_keep = torch.cat([torch.arange(g * group, (g + 1) * group) for g in kv_keep.tolist()])
        return q_keep, kv_keep
    q_keep = torch.cat([g * group + keep_top(by_group[g], group - cut.per_group) for g in range(num_kv)])
    return q_keep, torch.arange(num_kv)


def head_rows(heads: Tensor, head_dim: int) -> Tensor:
    """Row (or column) indices of a projection covering the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _copy_marks(source: nn.Linear, target: nn.Linear) -> nn.Linear:
    """Carry flags other layers set on the module (e.g. that it was a Conv1D) over to the sliced copy."""
    for key, value in vars(source).items():
        if key.startswith("_compress"):
            setattr(target, key, value)
    return target


def slice_rows(linear: nn.Linear, rows: Tensor) -> nn.Linear:
    """A Linear computing only output features ``rows`` of ``linear`` (weight rows and bias entries)."""
    w = linear.weight.detach()
    rows = rows.to(w.device)
    new = nn.Linear(linear.in_features, rows.numel(), bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w.index_select(0, rows))
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach().index_select(0, rows))
    new.requires_grad_(False)
    return _copy_marks(linear, new)


def slice_cols(linear: nn.Linear, cols: Tensor) -> nn.Linear:
    """A Linear reading only input features ``cols`` of ``linear`` (its bias is unchanged)."""
    w = linear.weight.detach()
    cols = cols.to(w.device)
    new = nn.Linear(cols.numel(), linear.out_features, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w.index_select(1, cols))
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
    new.requires_grad_(False)
    return _copy_marks(linear, new)

"""Structured pruning: remove MLP channels, attention heads or whole blocks, so the model really shrinks.

Unlike unstructured sparsity (zeros inside dense matrices), the result is a smaller dense model with a
smaller config, loadable by plain transformers. Every layer loses the same number of units so that the config
stays uniform; which units go is decided per layer by calibrated importance (``structured_math``), and the
output projection is then refit by least squares on the kept units (``refit``). Heads are
removed in GQA-consistent cuts: the same number of query heads from every KV group, or whole KV groups with
their query heads, so ``num_attention_heads`` stays a multiple of ``num_key_value_heads``.

The pass decides and slices; ``compress.pipeline.structured`` runs the calibration and
``compress.models.structure`` knows which modules are the MLP and attention projections of a family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from compress.core.errors import CompressError
from compress.passes.base import PASSES, ModelPass, PassConfig
from compress.passes.prune.structured_math import (
    ChannelEnergy,
    HeadCut,
    HeadGram,
    channel_scores,
    choose_heads,
    head_cuts,
    head_rows,
    head_scores,
    keep_top,
    refit,
    slice_cols,
    slice_rows,
)


class StructuredPruneConfig(PassConfig):
    method: Literal["structured"] = "structured"
    target: Literal["channels", "heads", "blocks"]
    """``channels``: MLP intermediate channels; ``heads``: attention heads; ``blocks``: whole decoder blocks."""
    ratio: float | None = None
    """Fraction to remove, 0 < ratio < 1: of each MLP's channels, of each layer's query heads (rounded to the
    nearest GQA-consistent cut), or of the blocks (``round(ratio × layers)``, at least 1)."""
    num_blocks: int | None = Field(None, ge=1)
    """``blocks`` only: the number of blocks to drop, overriding ``ratio``."""
    refit: bool = True
    """channels/heads: refit the output projection (down, o) on the kept units by least squares on the
    calibration activations, so it best reproduces the unpruned output (costs a features² Gram per layer,
    like GPTQ's Hessian). ``false``: only slice."""
    head_grouping: Literal["auto", "query", "kv"] = "auto"
    """``heads`` only: ``query`` removes the same number of query heads from every KV group, ``kv`` removes
    whole KV groups with their query heads, ``auto`` takes the cut closest to ``ratio`` (ties: ``query``,
    which keeps every KV head, each shared by several query heads)."""

    @field_validator("ratio")
    @classmethod
    def _ratio_open_interval(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value < 1:
            raise ValueError(f"structured ratio must be between 0 and 1 (exclusive), got {value}")
        return value

    @model_validator(mode="after")
    def _amount_given(self) -> StructuredPruneConfig:
        if self.num_blocks is not None and self.target != "blocks":
            raise ValueError("num_blocks applies to target 'blocks' only; use ratio for channels and heads")
        if self.ratio is None and self.num_blocks is None:
            raise ValueError(f"structured pruning of {self.target} needs a ratio between 0 and 1")
        return self


@PASSES.register("structured")
class StructuredPrune(ModelPass):
    """Decides what each layer keeps from calibration statistics and returns the sliced layers."""

    config_cls = StructuredPruneConfig
    config: StructuredPruneConfig

    def describe(self) -> str:
        if self.config.num_blocks is not None:
            return f"drop{self.config.num_blocks}blocks"
        return f"{self.config.target}{round(100 * (self.config.ratio or 0))}"

    # -- how much goes (raise before any work when the config cannot take it) --------------------------------

    def channels_removed(self, intermediate: int) -> int:
        removed = max(1, round((self.config.ratio or 0) * intermediate))
        if removed >= intermediate:
            raise CompressError(f"structured ratio {self.config.ratio} would remove every one of the "
                                f"{intermediate} MLP channels of a layer")
        return removed

    def head_cut(self, num_heads: int, num_kv: int,
                 refuses: Callable[[int, int], str | None] | None = None) -> HeadCut:
        """The cut applied to every layer: the GQA-consistent one closest to ``ratio × num_heads``.

        ``refuses(heads, kv)`` says why the model's config could not hold a cut (transformers validates some
        families' configs, e.g. Llama requires ``hidden_size`` to be a multiple of the head count), or None.
        """
        if num_kv < 1 or num_heads % num_kv:
            raise CompressError(f"{num_heads} attention heads do not split into {num_kv} KV groups")
        wanted = max(1, round((self.config.ratio or 0) * num_heads))
        if wanted >= num_heads:
            raise CompressError(f"structured ratio {self.config.ratio} would remove every one of the "
                                f"{num_heads} attention heads of a layer")
        cuts = head_cuts(num_heads, num_kv)
        mode = self.config.head_grouping
        if mode == "query":
            cuts = [c for c in cuts if not c.groups]
        elif mode == "kv":
            cuts = [c for c in cuts if c.groups]
        if not cuts:
            how = {"query": "query heads from each KV group", "kv": "whole KV groups"}.get(mode, "heads")
            raise CompressError(f"cannot remove {how} from {num_heads} attention heads in {num_kv} KV groups "
                                "and keep at least one (GQA groups must stay equal)")
        reasons = {c: refuses(num_heads - c.removed_heads(num_heads, num_kv), num_kv - c.groups)
                   for c in cuts} if refuses is not None else {}
        accepted = [c for c in cuts if reasons.get(c) is None]
        if not accepted:
            raise CompressError(f"no GQA-consistent cut of {num_heads} attention heads in {num_kv} KV groups "
                                f"gives a config the model's family accepts ({reasons[cuts[0]]})")
        return min(accepted, key=lambda c: (abs(c.removed_heads(num_heads, num_kv) - wanted), c.groups))

    # -- what was asked and what is done (the CLI says both: a head cut can differ from the ratio) -----------

    def summary(self, total: int, removed: int, *, num_kv: int = 0, cut: HeadCut | None = None) -> str:
        """One sentence: asked vs done, e.g. "heads: 25% asked, 2 of 4 query heads per block removed (50%,
        the nearest cut the config accepts; 1 of 2 from each of the 2 KV groups)"."""
        asked = (f"{self.config.num_blocks} asked" if self.config.num_blocks is not None
                 else f"{_percent(self.config.ratio or 0)} asked")
        share = _percent(removed / total) if total else "0%"
        target = self.config.target
        if target == "channels":
            return f"channels: {asked}, {removed} of {total} MLP channels per block removed ({share})"
        if target == "blocks":
            return f"blocks: {asked}, {removed} of {total} blocks dropped ({share})"
        wanted = max(1, round((self.config.ratio or 0) * total))
        near = "" if removed == wanted else ", the nearest cut the config accepts"
        group = total // num_kv if num_kv else total
        if cut is not None and cut.groups:
            how = f"{cut.groups} of {num_kv} KV groups, each with its {group} query heads"
        else:
            how = f"{cut.per_group if cut else 0} of {group} from each of the {num_kv} KV groups"
        return f"heads: {asked}, {removed} of {total} query heads per block removed ({share}{near}; {how})"

    def blocks_removed(self, num_layers: int) -> int:
        removed = self.config.num_blocks or max(1, round((self.config.ratio or 0) * num_layers))
        if removed >= num_layers:
            raise CompressError(f"dropping {removed} of the model's {num_layers} blocks would leave none")
        return removed

    # -- statistics and slicing ----------------------------------------------------------------------------

    def channel_stats(self, down: nn.Linear) -> ChannelEnergy:
        """Fed the input of the MLP's output projection (the intermediate activations)."""
        return ChannelEnergy(down.in_features, full=self.config.refit)

    def head_stats(self, o_proj: nn.Linear, head_dim: int) -> HeadGram:
        """Fed the input of the attention output projection (every head's output, concatenated)."""
        return HeadGram(o_proj.in_features // head_dim, head_dim, full=self.config.refit)

    def _output(self, linear: nn.Linear, cols, gram) -> nn.Linear:
        sliced = slice_cols(linear, cols)
        if gram is not None:
            with torch.no_grad():
                sliced.weight.copy_(refit(linear.weight, gram, cols).to(sliced.weight.device))
        return sliced

    def prune_mlp(self, inputs: list[nn.Linear], output: nn.Linear, stats: ChannelEnergy,
                  removed: int) -> tuple[list[nn.Linear], nn.Linear, list[int]]:
        """Keep the highest-energy channels: rows of every input projection, columns of the output one (refit
        by least squares on the kept channels' activations when ``refit``)."""
        scores = channel_scores(stats.sum_sq, output.weight)
        keep = keep_top(scores, output.in_features - removed)
        return [slice_rows(lin, keep) for lin in inputs], self._output(output, keep, stats.gram), keep.tolist()

    def prune_attention(self, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, *, head_dim: int,
                        num_kv: int, cut: HeadCut, stats: HeadGram) -> tuple[list[nn.Linear], list[int], list[int]]:
        """Sliced (q, k, v, o) and the query / KV heads kept, in their original order."""
        scores = head_scores(stats.gram, o.weight, head_dim)
        q_keep, kv_keep = choose_heads(scores, num_kv, cut)
        q_rows, kv_rows = head_rows(q_keep, head_dim), head_rows(kv_keep, head_dim)
        layers = [slice_rows(q, q_rows), slice_rows(k, kv_rows), slice_rows(v, kv_rows),
                  self._output(o, q_rows, stats.full_gram)]
        return layers, q_keep.tolist(), kv_keep.tolist()

    @staticmethod
    def blocks_to_drop(scores: list[float], removed: int) -> list[int]:
        """The ``removed`` blocks that change their input least (ties: the later block goes)."""
        order = sorted(range(len(scores)), key=lambda i: (scores[i], -i))
        return sorted(order[:removed])


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"

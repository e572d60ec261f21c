"""Structured pruning math and config: calibrated importance, GQA-consistent head cuts, slicing, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.core.errors import CompressError
from compress.passes.prune.structured import StructuredPrune, StructuredPruneConfig
from compress.passes.prune.structured_math import (
    BlockChange,
    ChannelEnergy,
    HeadCut,
    HeadGram,
    channel_scores,
    choose_heads,
    head_cuts,
    head_scores,
    keep_top,
    refit,
    slice_cols,
    slice_rows,
)
from compress.recipes.loader import recipe_from_dict


def _pass(**fields) -> StructuredPrune:
    return StructuredPrune(StructuredPruneConfig(method="structured", **fields))


def test_channel_score_is_activation_weighted_not_magnitude():
    """Channel 0 has the smallest down column but large activations; channel 1 big weights, no activation."""
    torch.manual_seed(0)
    down = torch.randn(8, 4)
    down[:, 0] *= 0.1
    down[:, 1] *= 10
    x = torch.randn(64, 4)
    x[:, 0] *= 100
    x[:, 1] = 0
    stats = ChannelEnergy(4)
    stats.add_batch(x.reshape(8, 8, 4))
    scores = channel_scores(stats.sum_sq, down)
    magnitude = down.norm(dim=0)
    assert magnitude.argmin() == 0  # magnitude alone would remove channel 0 ...
    assert scores.argmin() == 1  # ... the calibrated score removes the channel that never fires
    assert keep_top(scores, 3).tolist() == [0, 2, 3]
    expected = (x.double() ** 2).sum(0) * (down.double() ** 2).sum(0)
    torch.testing.assert_close(scores, expected)


def test_head_score_is_the_exact_output_energy_of_each_head():
    torch.manual_seed(0)
    heads, head_dim, out = 4, 3, 5
    o = nn.Linear(heads * head_dim, out, bias=False)
    x = torch.randn(2, 7, heads * head_dim)
    stats = HeadGram(heads, head_dim)
    stats.add_batch(x)
    scores = head_scores(stats.gram, o.weight, head_dim)
    flat = x.reshape(-1, heads, head_dim).double()
    w = o.weight.detach().double()
    for h in range(heads):
        contribution = flat[:, h] @ w[:, h * head_dim:(h + 1) * head_dim].T
        assert scores[h].item() == pytest.approx(contribution.square().sum().item(), rel=1e-5)  # Gram in fp32


def test_head_cuts_keep_gqa_groups_equal():
    cuts = head_cuts(8, 2)  # groups of 4 query heads
    assert all((8 - c.removed_heads(8, 2)) % (2 - c.groups) == 0 for c in cuts)
    assert {(c.per_group, c.groups) for c in cuts} == {(1, 0), (2, 0), (3, 0), (0, 1)}
    assert head_cuts(2, 2) == [HeadCut(per_group=0, groups=1)]  # MHA-like: whole groups are single heads
    assert head_cuts(1, 1) == []


def test_choose_heads_per_group_and_whole_groups():
    scores = torch.tensor([5.0, 1.0, 3.0, 4.0, 0.5, 0.2])  # 2 KV groups of 3
    q, kv = choose_heads(scores, 2, HeadCut(per_group=1, groups=0))
    assert q.tolist() == [0, 2, 3, 4] and kv.tolist() == [0, 1]  # weakest head of each group goes
    q, kv = choose_heads(scores, 2, HeadCut(per_group=0, groups=1))
    assert q.tolist() == [0, 1, 2] and kv.tolist() == [0]  # group 1 (4.7) < group 0 (9.0)


def test_head_cut_choice_follows_ratio_and_grouping():
    assert _pass(target="heads", ratio=0.25).head_cut(4, 2) == HeadCut(per_group=1, groups=0)  # 2 of 4: closest
    assert _pass(target="heads", ratio=0.25, head_grouping="kv").head_cut(4, 2) == HeadCut(per_group=0, groups=1)
    assert _pass(target="heads", ratio=0.25).head_cut(32, 8) == HeadCut(per_group=1, groups=0)  # exactly 8
    assert _pass(target="heads", ratio=0.5).head_cut(32, 8) == HeadCut(per_group=2, groups=0)
    assert _pass(target="heads", ratio=0.25).head_cut(16, 16) == HeadCut(per_group=0, groups=4)  # MHA
    with pytest.raises(CompressError, match="every one of the 4 attention heads"):
        _pass(target="heads", ratio=0.9).head_cut(4, 2)
    with pytest.raises(CompressError, match="GQA groups must stay equal"):
        _pass(target="heads", ratio=0.25, head_grouping="query").head_cut(4, 4)


def test_counts_and_refusals():
    assert _pass(target="channels", ratio=0.25).channels_removed(384) == 96
    assert _pass(target="channels", ratio=0.001).channels_removed(128) == 1  # at least one
    with pytest.raises(CompressError, match="every one of the 128 MLP channels"):
        _pass(target="channels", ratio=0.999).channels_removed(128)
    assert _pass(target="blocks", ratio=0.25).blocks_removed(8) == 2
    assert _pass(target="blocks", ratio=0.25, num_blocks=3).blocks_removed(8) == 3
    assert _pass(target="blocks", ratio=0.1).blocks_removed(4) == 1
    with pytest.raises(CompressError, match="would leave none"):
        _pass(target="blocks", num_blocks=4).blocks_removed(4)


@pytest.mark.parametrize("stage, message", [
    ({"target": "channels", "ratio": 0}, "between 0 and 1"),
    ({"target": "channels", "ratio": 1.0}, "between 0 and 1"),
    ({"target": "heads", "ratio": -0.5}, "between 0 and 1"),
    ({"target": "heads"}, "needs a ratio"),
    ({"target": "channels", "ratio": 0.2, "num_blocks": 1}, "num_blocks applies to target 'blocks' only"),
    ({"target": "layers", "ratio": 0.2}, "stages.0.target"),
])
def test_recipe_validation(stage, message):
    with pytest.raises(CompressError, match=message):
        recipe_from_dict({"stages": [{"method": "structured", **stage}]})


def test_recipe_accepts_num_blocks_without_ratio():
    recipe = recipe_from_dict({"stages": [{"method": "structured", "target": "blocks", "num_blocks": 1}]})
    assert recipe.stages[0].num_blocks == 1


def test_slices_compute_the_kept_features():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    x = torch.randn(3, 6)
    rows = torch.tensor([0, 3, 4])
    torch.testing.assert_close(slice_rows(linear, rows)(x), linear(x)[:, rows])
    cols = torch.tensor([1, 2, 5])
    sliced = slice_cols(linear, cols)
    torch.testing.assert_close(sliced(x[:, cols]), x[:, cols] @ linear.weight[:, cols].T + linear.bias)


def test_block_change_is_zero_for_identity_and_blocks_to_drop_takes_the_smallest():
    change = BlockChange()
    h = torch.randn(2, 5, 8)
    change.add(h, h * 3)  # a scaled copy points the same way
    assert change.score() == pytest.approx(0.0, abs=1e-6)
    assert StructuredPrune.blocks_to_drop([0.3, 0.1, 0.2, 0.05], 2) == [1, 3]


def test_head_cut_skips_counts_the_family_config_refuses():
    """transformers' LlamaConfig requires hidden_size % num_attention_heads == 0 (Qwen2's does not), so on
    hidden 1024 with 16 heads / 4 KV the 25% cut (12 heads) is not loadable: the nearest loadable one is taken."""
    from transformers import LlamaConfig, Qwen2Config

    from compress.models.structure import head_refusal

    shape = {"hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64}
    layer_pass = _pass(target="heads", ratio=0.25)
    assert layer_pass.head_cut(16, 4, head_refusal(LlamaConfig(**shape))) == HeadCut(per_group=2, groups=0)
    assert layer_pass.head_cut(16, 4, head_refusal(Qwen2Config(**shape))) == HeadCut(per_group=1, groups=0)
    with pytest.raises(CompressError, match="no GQA-consistent cut .* accepts \\(nope\\)"):
        layer_pass.head_cut(16, 4, lambda heads, kv: "nope")


def test_refit_recovers_what_the_removed_inputs_carried():
    """Input 3 is a mix of inputs 0 and 1: dropping it and refitting loses (almost) nothing; plain slicing does."""
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    x[:, 3] = 0.5 * x[:, 0] - 2 * x[:, 1]
    w = torch.randn(6, 4)
    gram = x.double().T @ x.double()
    keep = torch.tensor([0, 1, 2])
    refit_w = refit(w, gram, keep, damp=1e-8)
    target = x @ w.T
    refit_error = (x[:, keep] @ refit_w.T - target).norm() / target.norm()
    sliced_error = (x[:, keep] @ w[:, keep].T - target).norm() / target.norm()
    assert refit_error < 1e-5 < sliced_error


def test_full_gram_statistics_match_the_cheap_ones():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    cheap, full = ChannelEnergy(8), ChannelEnergy(8, full=True)
    heads, heads_full = HeadGram(2, 4), HeadGram(2, 4, full=True)
    for stat in (cheap, full, heads, heads_full):
        stat.add_batch(x)
    torch.testing.assert_close(full.sum_sq, cheap.sum_sq, rtol=1e-5, atol=1e-6)  # fp32 sums
    torch.testing.assert_close(heads_full.gram, heads.gram, rtol=1e-5, atol=1e-6)
    assert cheap.gram is None and full.gram.shape == (8, 8) and heads_full.full_gram.shape == (8, 8)

"""Block and layer discovery on every supported family, Conv1D conversion, and the target-pattern matcher."""

from __future__ import annotations

import pytest
import torch
from _tiny import EXPECTED, FAMILIES, build_model, tiny_config
from torch import nn
from transformers.pytorch_utils import Conv1D

from compress.core.errors import CompressError
from compress.core.targets import matches, matches_any
from compress.models.blocks import (
    convert_conv1d_to_linear,
    find_blocks,
    find_linears,
    plan_layers,
    select_layers,
)


def expected_names(family: str) -> list[str]:
    exp = EXPECTED[family]
    return [f"{exp.block_path}.{i}.{layer}" for i in range(2) for layer in exp.layers]


# --- core/targets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("lm_head", "lm_head", True),
        ("model.layers.0.mlp.down_proj", "down_proj", True),
        ("model.layers.0.mlp.down_proj", "mlp.down_proj", True),
        ("model.layers.0.mlp.down_proj", "*.mlp.down_proj", True),
        ("model.layers.0.mlp.down_proj", "*down_proj", True),
        ("model.layers.0.mlp.down_proj", "model.layers.*", True),
        ("model.layers.0.mlp.down_proj", "layers.0.*", True),
        ("model.layers.0.mlp.down_proj", "up_proj", False),
        ("model.layers.0.mlp.down_proj", "mlp", False),  # a parent component alone does not name the layer
        ("model.layers.0.mlp.down_proj", "proj", False),  # components match whole, not as substrings
        ("model.layers.0.mlp.down_proj", "Down_proj", False),  # case-sensitive
        ("model.layers.0.mlp.down_proj", "re:.*down_proj$", True),
        ("model.layers.0.mlp.down_proj", "re:down_proj", False),  # re.match anchors at the start
        ("model.layers.0.mlp.down_proj", r"re:model\.layers\.0\.", True),
        ("model.layers.10.mlp.down_proj", r"re:model\.layers\.1\.", False),
        ("transformer.h.0.attn.c_attn", "re:.*c_attn", True),
    ],
)
def test_matches(name: str, pattern: str, expected: bool) -> None:
    assert matches(name, pattern) is expected


def test_matches_any() -> None:
    assert matches_any("model.layers.0.self_attn.q_proj", ["lm_head", "q_proj"])
    assert not matches_any("model.layers.0.self_attn.q_proj", ["lm_head", "re:.*k_proj"])
    assert not matches_any("lm_head", [])
    assert matches_any("lm_head", "lm_head")  # a bare string is one pattern, not its characters
    assert not matches_any("l", "lm_head")


# --- blocks and layers per family ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_find_blocks_and_select_layers(family: str) -> None:
    model = build_model(family)
    convert_conv1d_to_linear(model)
    path, blocks = find_blocks(model)
    assert path == EXPECTED[family].block_path
    assert blocks is model.get_submodule(path) and len(blocks) == 2
    names = select_layers(model)
    assert names == expected_names(family)
    assert not any("lm_head" in n or "embed" in n or "wte" in n or "pooler" in n for n in names)
    # every selected name is a real Linear
    linears = find_linears(model)
    assert all(isinstance(linears[n], nn.Linear) for n in names)
    # the LM head and the embeddings exist but are excluded
    if EXPECTED[family].kind == "causal-lm":
        assert "lm_head" in linears and "lm_head" not in names


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_layers_matches_the_real_model_without_weights(family: str) -> None:
    plan = plan_layers(tiny_config(family))
    assert [n for n, _, _ in plan] == expected_names(family)
    model = build_model(family)
    convert_conv1d_to_linear(model)
    linears = find_linears(model)
    for name, fan_in, fan_out in plan:
        assert (fan_in, fan_out) == (linears[name].in_features, linears[name].out_features)
        assert fan_in % 64 == 0  # group sizes 32 and 64 divide every tiny layer


def test_select_layers_ignore_patterns() -> None:
    model = build_model("llama")
    all_names = select_layers(model, ignore=())
    assert len(all_names) == 14
    no_down = select_layers(model, ignore=("lm_head", "down_proj"))
    assert len(no_down) == 12 and not any(n.endswith("down_proj") for n in no_down)
    only_block1 = select_layers(model, ignore=(r"re:model\.layers\.0\.",))
    assert only_block1 == [n for n in all_names if n.startswith("model.layers.1.")]


def test_plan_layers_ignore_and_no_memory() -> None:
    plan = plan_layers(tiny_config("gpt2"), ignore=["c_fc"])
    assert [n for n, _, _ in plan] == [n for n in expected_names("gpt2") if not n.endswith("c_fc")]
    assert ("transformer.h.0.attn.c_attn", 64, 192) in plan  # Conv1D shape read as Linear (in, out)


# --- Conv1D conversion ---------------------------------------------------------------------------------------


def test_conv1d_to_linear_is_exact_and_marked() -> None:
    model = build_model("gpt2", seed=3)
    ref = build_model("gpt2", seed=3)
    assert isinstance(ref.transformer.h[0].attn.c_attn, Conv1D)
    conv = ref.transformer.h[0].mlp.c_fc
    converted = convert_conv1d_to_linear(model)
    assert converted == [
        f"transformer.h.{i}.{n}"
        for i in range(2)
        for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    lin = model.transformer.h[0].mlp.c_fc
    assert isinstance(lin, nn.Linear) and getattr(lin, "_compress_from_conv1d", False) is True
    assert lin.weight.shape == (conv.nf, conv.nx)
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(lin(x), conv(x))
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert convert_conv1d_to_linear(model) == []  # idempotent


def test_untouched_linears_are_not_marked() -> None:
    model = build_model("llama")
    assert convert_conv1d_to_linear(model) == []
    assert not any(hasattr(m, "_compress_from_conv1d") for m in model.modules())


# --- generic discovery ---------------------------------------------------------------------------------------


class _Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Linear(8, 16), nn.Linear(16, 8)


class _MoEBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.experts = nn.ModuleList(_Expert() for _ in range(4))


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.norms = nn.ModuleList(nn.LayerNorm(8) for _ in range(5))  # longer, but holds no Linear
        self.mixed = nn.ModuleList([nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)])  # not identical types
        self.layers = nn.ModuleList(_MoEBlock() for _ in range(2))
        self.head = nn.Linear(8, 10)


def test_find_blocks_prefers_outer_stack_over_nested_experts() -> None:
    path, blocks = find_blocks(_Toy())
    assert path == "layers" and len(blocks) == 2
    names = select_layers(_Toy(), ignore=("head",))
    assert names[:3] == ["layers.0.attn", "layers.0.experts.0.w1", "layers.0.experts.0.w2"]
    assert len(names) == 2 * (1 + 4 * 2)


def test_find_blocks_error_when_no_blocks() -> None:
    with pytest.raises(CompressError, match="cannot find the repeated transformer blocks in Sequential"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_find_linears_prefix_and_order() -> None:
    block = _MoEBlock()
    names = list(find_linears(block, "model.layers.3"))
    assert names[0] == "model.layers.3.attn" and names[-1] == "model.layers.3.experts.3.w2"
    assert list(find_linears(nn.Linear(2, 2), "solo")) == ["solo"]
    assert list(find_linears(block)) == [n.removeprefix("model.layers.3.") for n in names]

"""``method: rotate`` (QuaRot-style offline rotations): the Hadamard constructions, the exactness of the
rotated float model, determinism, refusals, and that rotating first lowers the error of a quantizer on a
model with outlier channels in its residual stream."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, Phi3Config, Qwen3Config

from compress.core.errors import CompressError
from compress.core.hadamard import hadamard, hadamard_kind, orthogonal, randomized_hadamard
from compress.models.rotation import rotation_layout
from compress.pipeline.engine import compress_model, layer_plan
from compress.pipeline.stage_order import check_stage_order

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import VOCAB_SIZE, tiny_config  # noqa: E402

ROTATE = {"method": "rotate", "kind": "hadamard", "seed": 0}


# ---- the matrices ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "kind"), [(64, "hadamard"), (12, "hadamard-1x12"), (28, "hadamard-1x28"),
                                         (96, "hadamard-8x12"), (896, "hadamard-32x28"), (20, "hadamard-1x20")])
def test_hadamard_matrices_are_hadamard(n, kind):
    h = hadamard(n)
    assert hadamard_kind(n) == kind
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [64, 96, 100, 6])
def test_rotations_are_orthogonal_and_seeded(n):
    q = randomized_hadamard(n, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, randomized_hadamard(n, seed=3))
    assert not torch.equal(q, randomized_hadamard(n, seed=4))
    assert not torch.allclose(q.abs(), torch.eye(n, dtype=torch.float64))  # not a signed permutation
    assert torch.allclose(orthogonal(n) @ orthogonal(n).T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    if hadamard(n) is None:
        assert hadamard_kind(n) == "random-orthogonal"


# ---- exactness on tiny models ----------------------------------------------------------------------------
def _model(family: str, *, tied: bool = False, **changes) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "qwen3":
        config = Qwen3Config(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    else:
        config = tiny_config(family)
    config.tie_word_embeddings = tied
    for key, value in changes.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms and biases away from their init, so the folds are exercised
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand_like(param) + 0.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.5)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


CASES = {
    "llama": ("llama", False, {}),
    "llama-tied": ("llama", True, {}),
    "llama-biases": ("llama", False, {"attention_bias": True, "mlp_bias": True}),
    "qwen2": ("qwen2", False, {}),
    "qwen2-tied": ("qwen2", True, {}),
    "mistral": ("mistral", False, {}),
    "qwen3": ("qwen3", True, {}),
    "llama-96": ("llama", False, {"hidden_size": 96, "head_dim": 24}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rotated_model_computes_the_same_logits(case):
    family, tied, changes = CASES[case]
    model = _model(family, tied=tied, **changes)
    original = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB_SIZE, (2, 24), generator=torch.Generator().manual_seed(1))
    before = _logits(original, ids)
    model, records = compress_model(model, [ROTATE])
    after = _logits(model, ids)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    # the weights really changed: every block linear, the embedding and the head
    for name, param in original.named_parameters():
        if param.dim() == 2:
            assert not torch.allclose(param, model.get_parameter(name), atol=1e-3), name
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for n, m in model.named_modules()
               if n.endswith(("layernorm", "model.norm")))
    assert len(records.layers) == 14 and {r.methods for r in records.layers.values()} == {("rotate",)}
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    assert bool(records.notes) == tied  # untying is said


def test_exact_in_float64():
    model = _model("qwen2").to(torch.float64)
    original = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB_SIZE, (1, 16), generator=torch.Generator().manual_seed(2))
    before = _logits(original, ids)
    after = _logits(compress_model(model, [ROTATE])[0], ids)
    assert (after - before).abs().max() < 1e-5  # RMSNorm computes in float32 even in a float64 model


def test_same_seed_same_weights_other_seed_other_weights():
    states = []
    for seed in (0, 0, 1):
        model = compress_model(_model("llama"), [{**ROTATE, "seed": seed}])[0]
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["model.embed_tokens.weight"], states[2]["model.embed_tokens.weight"])


# ---- refusals --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("config", "words"), [
    (OPTConfig(), "LayerNorm"), (Phi3Config(), "qkv_proj"), (tiny_config("gpt2"), "LayerNorm")])
def test_families_that_cannot_be_rotated_are_refused(config, words):
    with pytest.raises(CompressError, match=words) as error:
        rotation_layout(config)
    assert "supported: llama, mistral, qwen2, qwen3" in str(error.value)


def test_rotate_after_a_quantize_or_prune_stage_is_refused():
    model = _model("llama")
    from compress.pipeline.engine import build_passes

    for first in ({"method": "rtn"}, {"method": "magnitude", "sparsity": 0.5}):
        with pytest.raises(CompressError, match=r"must come before the stages that quantize or prune"):
            check_stage_order(layer_plan(model, build_passes([first, ROTATE])))
    check_stage_order(layer_plan(model, build_passes([ROTATE, {"method": "rtn"}])))


def test_rotate_takes_no_ignore_patterns():
    from pydantic import ValidationError

    from compress.passes.rotate.hadamard import RotateConfig

    with pytest.raises(ValidationError, match="no ignore patterns"):
        RotateConfig(ignore=["*down_proj"])


# ---- what rotation is for --------------------------------------------------------------------------------
def test_rotation_spreads_outlier_channels_and_lowers_the_rtn_error():
    """Channels 5 and 40 of the residual are read 25x harder than the rest (outlier columns in q/k/v and
    gate/up, as trained LLMs have): per-channel RTN then spends its range on them. Rotated first, the
    outliers are spread over every column and the same RTN loses less, in the weights and in the logits."""
    model = _model("llama", tied=False)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                module.weight[:, [5, 40]] *= 25
    ids = torch.randint(0, VOCAB_SIZE, (2, 32), generator=torch.Generator().manual_seed(3))
    reference = _logits(model, ids)
    rtn = {"method": "rtn", "bits": 4, "group_size": -1}
    errors, logits = {}, {}
    for tag, stages in (("rtn", [rtn]), ("rotate+rtn", [ROTATE, rtn])):
        quantized, records = compress_model(copy.deepcopy(model), stages)
        readers = [r.rel_weight_error for r in records if r.method == "rtn"
                   and r.name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))]
        errors[tag] = sum(readers) / len(readers)
        logits[tag] = (_logits(quantized, ids) - reference).pow(2).mean().item()
    assert errors["rotate+rtn"] < 0.5 * errors["rtn"], errors
    assert logits["rotate+rtn"] < logits["rtn"], logits


def test_layout_reads_heads_from_the_config():
    layout = rotation_layout(LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2))
    assert (layout.heads, layout.kv_heads, layout.head_dim) == (4, 2, 32)


@pytest.mark.parametrize(("target", "ratio"), [("heads", 0.5), ("channels", 0.25)])
def test_structured_then_rotate_rotates_the_smaller_model_exactly(target, ratio):
    """A structured stage may come first: the rotation reads the head counts the pruned config says."""
    from _tiny import SENTENCES, build_tokenizer

    ids = build_tokenizer()(SENTENCES, return_tensors="pt", padding="max_length", max_length=16,
                            truncation=True)["input_ids"]
    stage = {"method": "structured", "target": target, "ratio": ratio}
    pruned, _ = compress_model(_model("llama"), [stage], ids)
    rotated, _ = compress_model(_model("llama"), [stage, ROTATE], ids)
    before, after = _logits(pruned, ids), _logits(rotated, ids)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()

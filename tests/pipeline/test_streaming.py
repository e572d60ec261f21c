"""Streaming load: blocks are read from disk only when the sweep reaches them, with identical results."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import compress
from compress.models.load import load_model, load_model_streaming
from compress.recipes.loader import recipe_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny  # noqa: E402


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "opt", "phi", "bert"])
def test_streamed_weights_equal_the_eager_load(family, tmp_path):
    folder = save_tiny(family, tmp_path / family)
    streamed = load_model_streaming(str(folder))
    assert streamed is not None, f"{family} should stream"
    loaded, lazy, block_path = streamed
    eager = load_model(str(folder)).model.state_dict()
    blocks = loaded.model.get_submodule(block_path)
    for index in range(len(blocks)):
        lazy.load(f"{block_path}.{index}")
    for name, tensor in loaded.model.state_dict().items():
        torch.testing.assert_close(tensor, eager[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_unmappable_checkpoints_fall_back_to_eager(family, tmp_path):
    """GPT-2's Conv1D layers, and GPT-NeoX whose checkpoint names (embed_out) transformers renames on load."""
    assert load_model_streaming(str(save_tiny(family, tmp_path / family))) is None


def test_blocks_are_untouched_until_the_sweep_reaches_them(tmp_path, monkeypatch):
    from compress.models.lazy import LazyWeights

    read: list[str] = []
    original_read = LazyWeights._read
    monkeypatch.setattr(LazyWeights, "_read", lambda self, keys: (read.extend(keys), original_read(self, keys))[1])
    folder = save_tiny("llama", tmp_path / "llama")
    loaded, lazy, block_path = load_model_streaming(str(folder))
    eager = load_model(str(folder)).model
    name = f"{block_path}.1.mlp.down_proj.weight"
    # nothing of the blocks was read (comparing values would be flaky: torch.empty may reuse freed memory
    # that happens to hold the same weights)
    assert read and not any(key.startswith(f"{block_path}.") for key in read)
    torch.testing.assert_close(loaded.model.state_dict()["model.embed_tokens.weight"],
                               eager.state_dict()["model.embed_tokens.weight"])
    lazy.load(f"{block_path}.1")
    assert torch.equal(loaded.model.state_dict()[name], eager.state_dict()[name])


@pytest.mark.parametrize(("method", "dtype"), [("rtn", "auto"), ("gptq", "auto"), ("gptq", "bfloat16")])
def test_streamed_and_eager_runs_write_the_same_bytes(method, dtype, tmp_path):
    folder = save_tiny("llama", tmp_path / "llama")
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(60)))
    outputs = []
    for stream in (True, False):
        recipe = recipe_from_dict({
            "model": str(folder), "stream": stream, "eval": {"enabled": False}, "dtype": dtype,
            "calibration": {"dataset": str(corpus), "num_samples": 4, "seq_len": 32},
            "stages": [{"method": method, "bits": 4, "group_size": 32}],
        })
        out = tmp_path / f"out-{stream}"
        compress.run(recipe, out)
        outputs.append((out / "model.safetensors").read_bytes())
        if dtype == "bfloat16":  # --dtype is honoured on both paths (the streamed one used to ignore it)
            with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
                assert handle.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
                assert handle.get_tensor("model.layers.0.mlp.down_proj.weight_scale").dtype == torch.bfloat16
    assert outputs[0] == outputs[1]

"""Loading checkpoints: the happy paths per family, the dtype/pickle policies, and one sentence per user error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _tiny import build_model, save_tiny, write_pickle_only
from torch import nn

from compress.core.errors import CompressError
from compress.models.load import (
    DEMO_MODEL_DIR,
    load_config,
    load_model,
    load_tokenizer,
    model_kind,
    resolve_model_source,
)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_load_tiny_llama(tiny_llama_dir: Path) -> None:
    loaded = load_model(str(tiny_llama_dir))
    assert loaded.kind == "causal-lm"
    assert loaded.source == str(tiny_llama_dir.resolve())
    assert loaded.name == tiny_llama_dir.name
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    ids = loaded.tokenizer("the quick brown fox", return_tensors="pt").input_ids
    assert ids.numel() > 0
    with torch.no_grad():
        ref = build_model("llama")(ids).logits
        torch.testing.assert_close(loaded.model(ids).logits, ref)  # the weights are the saved ones


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "bert"])
def test_load_other_families(tiny_model_dir, family: str) -> None:
    loaded = load_model(str(tiny_model_dir(family)))
    assert loaded.kind == ("encoder" if family == "bert" else "causal-lm")
    assert loaded.tokenizer("the cat sat", add_special_tokens=False).input_ids  # tokenizer really tokenizes
    if family == "bert":
        assert type(loaded.model).__name__ == "BertModel"
    if family == "gpt2":
        c_attn = loaded.model.transformer.h[0].attn.c_attn
        assert isinstance(c_attn, nn.Linear) and c_attn._compress_from_conv1d is True
        ids = torch.randint(0, 128, (1, 7))
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(ids).logits, build_model("gpt2")(ids).logits)


def test_dtype_auto_keeps_checkpoint_dtype_and_explicit_dtype(tmp_path: Path) -> None:
    folder = save_tiny("llama", tmp_path / "half", dtype=torch.float16)
    assert next(load_model(str(folder)).model.parameters()).dtype == torch.float16
    assert next(load_model(str(folder), dtype="float32").model.parameters()).dtype == torch.float32
    assert next(load_model(str(folder), dtype="bfloat16").model.parameters()).dtype == torch.bfloat16
    with pytest.raises(CompressError, match="unsupported dtype 'int3'"):
        load_model(str(folder), dtype="int3")


def test_load_config_and_tokenizer_need_no_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    cfg = load_config(str(folder))
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 2
    assert load_tokenizer(str(folder)).eos_token == "</s>"


# --- source resolution ----------------------------------------------------------------------------------------


def test_resolve_model_source(tiny_llama_dir: Path, monkeypatch, tmp_path: Path) -> None:
    assert DEMO_MODEL_DIR.parts[-3:] == ("compress", "assets", "demo")
    if (DEMO_MODEL_DIR / "config.json").is_file():
        assert resolve_model_source(None) == str(DEMO_MODEL_DIR)
    else:
        with pytest.raises(CompressError, match="embedded demo model is missing"):
            resolve_model_source(None)
    assert resolve_model_source(str(tiny_llama_dir)) == str(tiny_llama_dir.resolve())
    assert resolve_model_source("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert resolve_model_source("gpt2") == "gpt2"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        "compress.models.load.DEMO_MODEL_DIR", tiny_llama_dir
    )  # "demo" means the embedded model
    assert resolve_model_source("demo") == str(tiny_llama_dir)
    assert resolve_model_source(None) == str(tiny_llama_dir)
    assert load_model(None).name == "demo"  # default output folders are named after "demo", not the path


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "causal-lm"),
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "causal-lm"),
        ({"architectures": ["BertModel"], "model_type": "bert"}, "encoder"),
        ({"architectures": ["BertForMaskedLM"], "model_type": "bert"}, "encoder"),
        ({"architectures": None, "model_type": "llama"}, "causal-lm"),
        ({"architectures": None, "model_type": "bert"}, "encoder"),
        ({"architectures": [], "model_type": "mistral"}, "causal-lm"),
    ],
)
def test_model_kind(config: dict, kind: str) -> None:
    assert model_kind(SimpleNamespace(**config)) == kind


# --- errors: one sentence each ----------------------------------------------------------------------------------


def test_error_path_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(CompressError, match=r"model path '.*nope' does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(CompressError, match="does not exist"):
        load_model("./no/such/model")


def test_error_path_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CompressError, match="is a file, not a model folder"):
        load_model(str(f))


def test_error_no_config(tmp_path: Path) -> None:
    with pytest.raises(CompressError, match="has no config.json"):
        load_model(str(tmp_path))


def test_error_no_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CompressError, match=r"has no weights \(no \*\.safetensors file\)"):
        load_model(str(folder))


def test_error_corrupt_config(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama_dir, tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CompressError, match="could not read the config of model"):
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(CompressError, match="could not read the config of model"):
        load_config(str(folder))


def test_error_corrupt_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama_dir, tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(CompressError, match="could not read the weights of model") as info:
        load_model(str(folder))
    assert "\n" not in str(info.value)


def test_error_hub_unreachable() -> None:
    # conftest sets HF_HUB_OFFLINE=1, which is how transformers reports an unreachable hub without waiting
    msg = (
        "could not load model 'foo/bar': no local folder of that name and the Hugging Face Hub is unreachable"
    )
    with pytest.raises(CompressError, match=msg):
        load_model("foo/bar")
    with pytest.raises(CompressError, match="Hugging Face Hub is unreachable"):
        load_config("foo/bar")


def test_error_missing_tokenizer(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_llama_dir, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(CompressError, match="has no usable tokenizer"):
        load_model(str(folder))


def test_pickle_only_refused_then_accepted(tmp_path: Path) -> None:
    folder = write_pickle_only("llama", tmp_path / "legacy")
    with pytest.raises(CompressError, match=r"only pickle weights \(pytorch_model\.bin\).*--allow-pickle"):
        load_model(str(folder))
    loaded = load_model(str(folder), allow_pickle=True)
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, build_model("llama")(ids).logits)


def test_error_bad_device(tiny_llama_dir: Path) -> None:
    with pytest.raises(CompressError, match="device"):
        load_model(str(tiny_llama_dir), device="quantum")


@pytest.mark.skipif(
    not (DEMO_MODEL_DIR / "config.json").is_file(), reason="embedded demo model not built yet"
)
def test_demo_model_loads() -> None:
    loaded = load_model(None)
    assert loaded.name == "demo" and loaded.kind == "causal-lm"
    assert loaded.source == str(DEMO_MODEL_DIR)

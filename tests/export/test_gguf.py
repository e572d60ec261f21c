"""``compress export --format gguf``: our codes in llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks, read back by ``gguf``.

A tiny llama (GQA: 4 heads, 2 kv heads) is quantized through the CLI at W4g32 sym, W4g32 asym, W8g32 and W4g32
with float16 scales, exported, and read back with the released ``gguf`` package: every quantized tensor,
dequantized by ``gguf.quants.dequantize``, must equal the weight ``compress.load`` reconstructs (after
llama.cpp's q/k row permutation, re-implemented here as its converter writes it) within the fp16 rounding of
the block scales the module docstring states; bit for bit when the scales are fp16 already. Metadata, tensor
names and byte counts are llama.cpp's. Bad input exits 2 with nothing written, and a file that is not GGUF is
never replaced. When llama-cpp-python is importable, llama.cpp itself runs the embedded demo model's export.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import gguf  # the gguf extra is in dev: missing is a failure, never a skip
import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from typer.testing import CliRunner

import compress
from compress.cli.main import app
from compress.core.errors import CompressError
from compress.export.gguf import encode_blocks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny  # noqa: E402

runner = CliRunner()
U16 = 2.0 ** -11  # fp16 unit roundoff
# the largest code multiplier per block type, in quantization steps: |q| <= 8, |u| + |zp + 8| <= 15 + 15, |q| <= 128
STEPS = {"Q4_0": 8, "Q4_1": 30, "Q8_0": 128}
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
SCHEMES = {"w4": ("Q4_0", []), "w4a": ("Q4_1", ["--asym"]), "w8": ("Q8_0", ["--bits", "8"]),
           "w4h": ("Q4_0", ["--dtype", "float16"])}
LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _quantize(model: Path, out: Path, corpus: Path, *flags: str) -> Path:
    args = ["quantize", str(model), "--method", "rtn", "--group-size", "32", *flags, "--dataset", str(corpus),
            "--num-samples", "2", "--seq-len", "16", "--no-eval", "--output", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def _export(source: Path, target: Path, *flags: str):
    return runner.invoke(app, ["export", str(source), "--format", "gguf", "--output", str(target), *flags])


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    model = save_tiny("llama", root / "llama")
    corpus = root / "calib.txt"
    corpus.write_text("\n\n".join(f"a small model {i} learns to predict the next word" for i in range(80)))
    found = {"model": model, "root": root, "corpus": corpus}
    for name, (_, flags) in SCHEMES.items():
        found[name] = _quantize(model, root / name, corpus, *flags)
    return found


@pytest.fixture(scope="module")
def exported(folders) -> dict[str, tuple[Path, dict]]:
    done = {}
    for name in SCHEMES:
        target = folders["root"] / "gguf" / f"{name}.gguf"
        result = _export(folders[name], target, "--json")
        assert result.exit_code == 0, result.output
        done[name] = (target, json.loads(result.stdout))
    return done


def _hf_name(gguf_name: str) -> str:
    """The transformers parameter (or module, for a quantized Linear) a llama GGUF tensor comes from."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return top[gguf_name]
    _, index, short, _ = gguf_name.split(".")
    layer = {v: k for k, v in LLAMA_NAMES.items()}[short]
    return f"model.layers.{index}.{layer}.weight"


def _llama_cpp_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute (q with n_head, k with n_head_kv)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _ours(model: torch.nn.Module, hf: str) -> torch.Tensor:
    """The dense weight compress.load runs with, in llama.cpp's row order, float64."""
    module_name = hf.removesuffix(".weight")
    module = model.get_submodule(module_name)
    weight = (module.dequantized_weight(torch.float64) if hasattr(module, "dequantized_weight")
              else module.weight.detach().double())
    if module_name.endswith("q_proj"):
        weight = _llama_cpp_permute(weight, model.config.num_attention_heads)
    elif module_name.endswith("k_proj"):
        weight = _llama_cpp_permute(weight, model.config.num_key_value_heads)
    return weight


def _scales(folder: Path, hf: str, model: torch.nn.Module) -> torch.Tensor:
    """Our float scale per weight (one per group of 32 inputs), in llama.cpp's row order."""
    module_name = hf.removesuffix(".weight")
    scale = model.get_submodule(module_name).weight_scale.detach().double()
    if module_name.endswith("q_proj"):
        scale = _llama_cpp_permute(scale, model.config.num_attention_heads)
    elif module_name.endswith("k_proj"):
        scale = _llama_cpp_permute(scale, model.config.num_key_value_heads)
    return scale.repeat_interleave(32, dim=1)


def _readback(path: Path) -> dict[str, tuple[str, torch.Tensor]]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, torch.from_numpy(np.array(dequantize(t.data, t.tensor_type))).double())
            for t in reader.tensors}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_block_types_and_names(exported, name):
    path, payload = exported[name]
    kind = SCHEMES[name][0]
    found = {n: t for n, (t, _) in _readback(path).items()}
    layers = {f"blk.{i}.{short}.weight" for i in range(2) for short in LLAMA_NAMES.values()}
    assert set(found) == layers | {"token_embd.weight", "output_norm.weight", "output.weight"}
    dense = "F16" if name == "w4h" else "F32"  # 2-D fp16 tensors stay F16; norms are always F32
    for tensor, got in found.items():
        if tensor.endswith("_norm.weight"):
            assert got == "F32", tensor
        elif tensor in ("token_embd.weight", "output.weight"):
            assert got == dense, tensor
        else:
            assert got == kind, tensor
    assert payload["types"][kind] == 14 and payload["architecture"] == "llama" and payload["tensors"] == 21
    assert payload["output"] == str(path) and not [p for p in path.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name", ["w4", "w4a", "w8"])
def test_dequantized_weights_match_within_fp16_scale_rounding(folders, exported, name):
    path, payload = exported[name]
    model = compress.load(folders[name], device="cpu", kernel="reference")
    largest = 0.0
    for tensor, (kind, theirs) in _readback(path).items():
        hf = _hf_name(tensor)
        ours = _ours(model, hf)
        assert theirs.shape == ours.shape, tensor
        if kind == "F32":
            assert torch.equal(theirs, ours), tensor
            continue
        step = _scales(folders[name], hf, model).abs()
        error = (theirs - ours).abs()
        # fp16 rounding of d (and m) times the code, plus float32 arithmetic in gguf's dequantize
        bound = U16 * STEPS[kind] * step * (1 + 1e-6) + 2.0 ** -23 * ours.abs() + 1e-12
        assert bool((error <= bound).all()), f"{tensor}: {float((error / step).max())} steps"
        largest = max(largest, float(error.max()))
    assert largest > 0  # float32 scales: the rounding is real, and it is what the summary reports
    assert payload["scales"]["from"] == "float32" and payload["scales"]["exact"] is False
    assert payload["scales"]["max_abs_error"] == pytest.approx(largest, rel=1e-3, abs=1e-8)
    assert payload["scales"]["max_error_steps"] <= U16 * STEPS[SCHEMES[name][0]]


def test_float16_scales_are_copied_bit_for_bit(folders, exported):
    path, payload = exported["w4h"]
    model = compress.load(folders["w4h"], device="cpu", kernel="reference")
    for tensor, (_, theirs) in _readback(path).items():
        assert torch.equal(theirs, _ours(model, _hf_name(tensor))), tensor
    assert payload["scales"]["from"] == "float16" and payload["scales"]["exact"] is True
    assert payload["scales"]["max_abs_error"] == 0.0


def test_metadata_and_tokenizer(folders, exported):
    path, _ = exported["w4"]
    reader = gguf.GGUFReader(str(path))
    field = {name: f.contents() for name, f in reader.fields.items()}
    config = json.loads((folders["w4"] / "config.json").read_text())
    assert field["general.architecture"] == "llama"
    assert field["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    assert field["llama.block_count"] == config["num_hidden_layers"] == 2
    assert field["llama.embedding_length"] == config["hidden_size"]
    assert field["llama.feed_forward_length"] == config["intermediate_size"]
    assert field["llama.context_length"] == config["max_position_embeddings"]
    assert (field["llama.attention.head_count"], field["llama.attention.head_count_kv"]) == (4, 2)
    assert field["llama.rope.dimension_count"] == config["hidden_size"] // config["num_attention_heads"]
    assert field["llama.rope.freq_base"] == config["rope_parameters"]["rope_theta"]
    assert field["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"], rel=1e-6)
    assert field["llama.vocab_size"] == config["vocab_size"]

    tok = json.loads((folders["w4"] / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "gpt-2"
    assert field["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    assert field["tokenizer.ggml.merges"] == merges and merges
    types = field["tokenizer.ggml.token_type"]
    assert types[vocab["</s>"]] == int(gguf.TokenType.CONTROL) and types[vocab["the"]] == int(gguf.TokenType.NORMAL)
    assert field["tokenizer.ggml.bos_token_id"] == vocab["<s>"]
    assert field["tokenizer.ggml.eos_token_id"] == vocab["</s>"]


@pytest.mark.parametrize("name", list(SCHEMES))
def test_bytes_are_the_block_sizes(folders, exported, name):
    path, payload = exported[name]
    reader = gguf.GGUFReader(str(path))
    total = 0
    for t in reader.tensors:
        count = int(np.prod(t.shape))
        kind = t.tensor_type.name
        expected = count // 32 * BLOCK_BYTES[kind] if kind in BLOCK_BYTES else count * {"F32": 4, "F16": 2}[kind]
        assert t.n_bytes == expected, t.name
        total += expected
    size = path.stat().st_size
    assert payload["bytes"] == size and 0 < size - total < 16 * 1024  # header, metadata, alignment
    checkpoint = sum(f.stat().st_size for f in folders[name].glob("*.safetensors"))
    assert payload["checkpoint_bytes"] == checkpoint
    assert abs(size - checkpoint) / checkpoint < 0.1


def test_same_checkpoint_same_bytes(folders, exported, tmp_path):
    again = tmp_path / "again.gguf"
    assert _export(folders["w4"], again).exit_code == 0
    assert again.read_bytes() == exported["w4"][0].read_bytes()


def test_overwrite_replaces_only_a_gguf_file(folders, tmp_path):
    target = tmp_path / "model.gguf"
    assert _export(folders["w4"], target).exit_code == 0
    before = target.read_bytes()
    refused = _export(folders["w4a"], target)
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr and target.read_bytes() == before
    replaced = _export(folders["w4a"], target, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert {t for t, _ in _readback(target).values()} == {"Q4_1", "F32"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


@pytest.fixture(scope="module")
def bad_sources(folders) -> dict[str, Path]:
    root, model, corpus = folders["root"], folders["model"], folders["corpus"]
    qwen = save_tiny("qwen2", root / "qwen2")
    found = {"w4g64": _quantize(model, root / "w4g64", corpus, "--group-size", "64"),
             "w3a": _quantize(model, root / "w3a", corpus, "--bits", "3", "--asym"),
             "w8a": _quantize(model, root / "w8a", corpus, "--bits", "8", "--asym"),
             "qwen2": _quantize(qwen, root / "qwen2-w4", corpus), "dense": model}
    gptq = root / "w4-gptq"
    result = runner.invoke(app, ["convert", str(folders["w4"]), "--to", "gptq", "--output", str(gptq)])
    assert result.exit_code == 0, result.output
    found["gptq"] = gptq
    return found


@pytest.mark.parametrize(("source", "needle"), [
    ("w4g64", "(group 64) has no GGUF block type: GGUF export maps symmetric int4, asymmetric int4 and "
              "symmetric int8 weights in groups of 32"),
    ("w3a", "(asymmetric 3-bit) has no GGUF block type"),
    ("w8a", "(asymmetric 8-bit) has no GGUF block type"),
    ("qwen2", "supports llama-family models"),
    ("dense", "not a quantized checkpoint"),
    ("gptq", "compress convert --to compressed-tensors first"),
])
def test_bad_input_exits_2_and_writes_nothing(bad_sources, tmp_path, source, needle):
    target = tmp_path / "out" / "model.gguf"
    result = _export(bad_sources[source], target)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # not even the folder made for it


def _edit_config(data: dict, tok: dict) -> None:
    data["attention_bias"] = True


def _edit_rope(data: dict, tok: dict) -> None:
    data["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}


def _edit_window(data: dict, tok: dict) -> None:
    data["sliding_window"] = 64


def _edit_tokenizer(data: dict, tok: dict) -> None:
    tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}


def _edit_vocab(data: dict, tok: dict) -> None:
    tok["added_tokens"].append({"id": 500, "content": "<extra>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})


@pytest.mark.parametrize(("edit", "needle"), [
    (_edit_config, "with attention or MLP biases is not supported"),
    (_edit_rope, "default RoPE only; this model uses linear RoPE scaling"),
    (_edit_window, "sliding window of 64 tokens"),
    (_edit_tokenizer, "byte-level BPE tokenizers with GPT-2 pre-tokenization only"),
    (_edit_vocab, "GGUF needs one embedding row per token"),
])
def test_what_llama_cpp_would_run_differently_is_refused(folders, tmp_path, edit, needle):
    source = tmp_path / "edited"
    shutil.copytree(folders["w4"], source)
    config, tokenizer = json.loads((source / "config.json").read_text()), json.loads(
        (source / "tokenizer.json").read_text())
    edit(config, tokenizer)
    (source / "config.json").write_text(json.dumps(config))
    (source / "tokenizer.json").write_text(json.dumps(tokenizer))
    result = _export(source, tmp_path / "model.gguf")
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]


def test_output_refusals_leave_everything_untouched(folders, tmp_path):
    other = tmp_path / "notes.gguf"
    other.write_bytes(b"not a gguf file, keep me")
    result = _export(folders["w4"], other, "--overwrite")
    assert result.exit_code == 2 and "is not a GGUF file" in result.stderr
    assert other.read_bytes() == b"not a gguf file, keep me"

    folder = tmp_path / "dir.gguf"
    folder.mkdir()
    result = _export(folders["w4"], folder, "--overwrite")
    assert result.exit_code == 2 and "is a folder" in result.stderr and not any(folder.iterdir())

    link = tmp_path / "link.gguf"
    link.symlink_to(other)
    result = _export(folders["w4"], link, "--overwrite")
    assert result.exit_code == 2 and "symbolic link" in result.stderr and other.read_bytes().startswith(b"not")

    inside = folders["w4"] / "model.gguf"
    result = _export(folders["w4"], inside)
    assert result.exit_code == 2 and "inside the source checkpoint" in result.stderr and not inside.exists()

    result = runner.invoke(app, ["export", str(folders["w4"]), "--format", "onnx", "--output",
                                 str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "use gguf" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.gguf", "link.gguf", "notes.gguf"]


def test_missing_extra_names_the_install_command(folders, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    result = _export(folders["w4"], tmp_path / "model.gguf", "--json")
    assert result.exit_code == 2
    assert "pip install 'compress-toolkit[gguf]'" in json.loads(result.stdout)["error"]
    assert not any(tmp_path.iterdir())


def test_scale_beyond_fp16_is_refused():
    codes = torch.ones(1, 32, dtype=torch.int8)
    encode_blocks(codes, torch.tensor([[0.5]]), None, "Q4_0")  # fine
    with pytest.raises(CompressError, match="outside what fp16 holds"):
        encode_blocks(codes, torch.tensor([[1e6]]), None, "Q4_0")


# ---- llama.cpp itself ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_exports(tmp_path_factory, folders) -> dict[str, Path]:
    from compress.models.load import DEMO_MODEL_DIR

    root = tmp_path_factory.mktemp("gguf-demo")
    found = {}
    for name in ("w4", "w4a", "w8"):
        checkpoint = _quantize(DEMO_MODEL_DIR, root / name, folders["corpus"], *SCHEMES[name][1])
        result = _export(checkpoint, root / f"{name}.gguf")
        assert result.exit_code == 0, result.output
        found[name] = checkpoint
    return found


def test_demo_export_says_to_add_bos(demo_exports):
    """The demo tokenizer's post-processor prepends <s>: llama.cpp must be told to add it too."""
    field = {n: f.contents() for n, f in gguf.GGUFReader(str(demo_exports["w4"].parent / "w4.gguf")).fields.items()}
    vocab = json.loads((demo_exports["w4"] / "tokenizer.json").read_text())["model"]["vocab"]
    assert field["tokenizer.ggml.add_bos_token"] is True and field["tokenizer.ggml.bos_token_id"] == vocab["<s>"]
    assert field["tokenizer.ggml.add_eos_token"] is False


@pytest.mark.parametrize("name", ["w4", "w4a", "w8"])
def test_llama_cpp_runs_the_export_with_our_logits(demo_exports, name):
    """The trained demo model (a random one barely depends on the q/k row order): llama.cpp's logits on the
    same tokens agree with compress.load's within llama.cpp's own rounding (its CPU matmuls quantize activations
    to 8-bit blocks); measured ~0.7% of the largest logit, ~47% with the q/k permutation left out."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (an sdist only)")
    from transformers import AutoTokenizer

    checkpoint = demo_exports[name]
    text = "the quick brown fox jumps over the lazy dog"
    ids = AutoTokenizer.from_pretrained(str(checkpoint))(text)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(checkpoint.parent / f"{name}.gguf"), n_ctx=64, n_batch=64,
                          logits_all=True, verbose=False, n_threads=1)
    try:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids  # tokens, merges, add_bos
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()
    model = compress.load(checkpoint, device="cpu", kernel="reference")
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double().numpy()
    assert np.abs(theirs - ours).max() <= 0.03 * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9

"""The GPTQ layout: bit layout against AutoGPTQ's packing loop, the v1 zero-point trap, lossless round trips,
refusals, and ``compress quantize --format gptq`` / ``compress convert`` end to end on a tiny Llama."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import compress
from compress.cli.main import app
from compress.core.errors import CompressError
from compress.core.packing import pack_weight
from compress.core.scheme import QuantScheme
from compress.export.gptq import from_gptq, layer_from_gptq, to_gptq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny, write_rotated_corpus  # noqa: E402

runner = CliRunner()


def autogptq_pack_rows(u: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ/GPTQModel ``QuantLinear.pack``'s row loop, transcribed: unsigned codes ``[in, out]`` → int32
    ``[in*bits/32, out]``. 2/4/8 bits put 32/bits codes per word; 3 bits put 32 codes in 3 words, the 11th and
    22nd straddling a word boundary (bits 30-31 + bit 0, then bit 31 + bits 0-1)."""
    v = u.to(torch.int64).numpy().astype("uint64")
    rows = v.shape[0] * bits // 32
    out = [[0] * v.shape[1] for _ in range(rows)]
    for col in range(v.shape[1]):
        i, row = 0, 0
        while row < rows:
            if bits != 3:
                for j in range(32 // bits):
                    out[row][col] |= int(v[i + j, col]) << (bits * j)
                i, row = i + 32 // bits, row + 1
                continue
            for j in range(10):
                out[row][col] |= int(v[i + j, col]) << (3 * j)
            i += 10
            out[row][col] |= (int(v[i, col]) << 30) & 0xFFFFFFFF
            out[row + 1][col] |= (int(v[i, col]) >> 2) & 1
            i, row = i + 1, row + 1
            for j in range(10):
                out[row][col] |= int(v[i + j, col]) << (3 * j + 1)
            i += 10
            out[row][col] |= (int(v[i, col]) << 31) & 0xFFFFFFFF
            out[row + 1][col] |= (int(v[i, col]) >> 1) & 3
            i, row = i + 1, row + 1
            for j in range(10):
                out[row][col] |= int(v[i + j, col]) << (3 * j + 2)
            i, row = i + 10, row + 1
    t = torch.tensor(out, dtype=torch.int64)
    return torch.where(t >= 1 << 31, t - (1 << 32), t).to(torch.int32)


def _layer(scheme: QuantScheme, out_f: int = 64, in_f: int = 128, act_order: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    w = torch.randn(out_f, in_f) + 0.2
    g_idx = None
    if act_order:
        gs = scheme.effective_group_size(in_f)
        g_idx = (torch.arange(in_f) // gs)[torch.randperm(in_f)].to(torch.int32)
    return pack_weight(w, scheme, g_idx=g_idx, scale_dtype=torch.float16).tensors("m.layer")


SCHEMES = [QuantScheme(b, g, s) for b in (2, 3, 4, 8) for g in (-1, 32) for s in (True, False)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qweight_is_autogptq_bit_layout(bits):
    tensors = _layer(QuantScheme(bits, 32, False))
    gptq, _ = to_gptq(tensors, {"m.layer": QuantScheme(bits, 32, False)})
    from compress.core.packing import unpack_codes

    u = unpack_codes(tensors["m.layer.weight_packed"], bits, 128).to(torch.int64) + (1 << (bits - 1))
    assert torch.equal(gptq["m.layer.qweight"], autogptq_pack_rows(u.t(), bits))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.tag)
@pytest.mark.parametrize("act_order", [False, True])
def test_round_trip_is_lossless(scheme, act_order):
    tensors = _layer(scheme, act_order=act_order)
    gptq, config = to_gptq(tensors, {"m.layer": scheme})
    assert config["checkpoint_format"] == ("gptq" if scheme.symmetric else "gptq_v2")
    assert config["desc_act"] is act_order and config["quant_method"] == "gptq"
    assert config["meta"]["quantizer"].startswith("compress-toolkit ")
    assert gptq["m.layer.qweight"].shape == (128 * scheme.bits // 32, 64)
    assert gptq["m.layer.scales"].dtype == torch.float16 and gptq["m.layer.g_idx"].shape == (128,)
    back, schemes = from_gptq(gptq, config)
    assert schemes == {"m.layer": scheme}
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(back[name], tensor), name


def test_v1_symmetric_zeros_are_stored_minus_one_per_element():
    scheme = QuantScheme(4, 32, True)
    gptq, config = to_gptq(_layer(scheme), {"m.layer": scheme})
    assert config["checkpoint_format"] == "gptq"
    assert bool((gptq["m.layer.qzeros"] == 0x77777777).all())  # zero 8 stored as 7 in every nibble


def test_v1_read_adds_one_per_element_without_borrowing():
    """A zero of 0 written per element as -1 (masked to 0xF) must not disturb its neighbours on read; a
    whole-word +0x11111111 would carry into the next nibble."""
    scheme = QuantScheme(4, -1, False)
    zeros = torch.tensor([[0, 5, 15, 0, 1, 8, 0, 3]])  # [1 group, 8 outputs], unsigned
    stored = (zeros - 1) & 0xF
    from compress.core.packing import pack_codes

    qzeros = pack_codes(stored - 8, 4)
    qweight = torch.zeros(32 * 4 // 32, 8, dtype=torch.int32)
    tensors = {"p.qweight": qweight, "p.qzeros": qzeros, "p.scales": torch.ones(1, 8, dtype=torch.float16),
               "p.g_idx": torch.zeros(32, dtype=torch.int32)}
    ct = layer_from_gptq("p", tensors, scheme, "gptq", desc_act=False)
    from compress.core.packing import unpack_zero_point

    assert unpack_zero_point(ct["p.weight_zero_point"], 4, 8).flatten().tolist() == (zeros - 8).flatten().tolist()


def test_refusals():
    a, b = QuantScheme(4, 32, True), QuantScheme(8, 32, True)
    tensors = {**_layer(a), **{k.replace("m.layer", "m.other"): v for k, v in _layer(b).items()}}
    with pytest.raises(CompressError, match="mixes w4g32, w8g32"):
        to_gptq(tensors, {"m.layer": a, "m.other": b})
    odd = _layer(QuantScheme(4, -1, True), out_f=64, in_f=36)
    with pytest.raises(CompressError, match="multiples of 8"):
        to_gptq(odd, {"m.layer": QuantScheme(4, -1, True)})
    with pytest.raises(CompressError, match="inside a decoder block is left dense"):
        to_gptq(_layer(a), {"m.layer": a}, dense_in_blocks=["m.dense"])
    big = _layer(a)
    big["m.layer.weight_scale"] = big["m.layer.weight_scale"].float() * 1e6
    with pytest.raises(CompressError, match="float16 range"):
        to_gptq(big, {"m.layer": a})


def test_fp32_scales_warn_on_the_compress_logger(caplog):
    scheme = QuantScheme(4, 32, True)
    tensors = _layer(scheme)
    tensors["m.layer.weight_scale"] = tensors["m.layer.weight_scale"].float() * (1 + 1e-6)
    with caplog.at_level(logging.WARNING, logger="compress"):
        gptq, _ = to_gptq(tensors, {"m.layer": scheme})
    assert any("stores scales as float16" in r.getMessage() for r in caplog.records)
    assert torch.equal(gptq["m.layer.scales"], tensors["m.layer.weight_scale"].half().t())


# ---- end to end -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gptq-e2e")
    corpus = root / "calib.txt"
    write_rotated_corpus(corpus, shift=7)
    return save_tiny("llama", root / "llama"), corpus


def _quantize(model: Path, corpus: Path, out: Path, *extra: str) -> dict:
    result = runner.invoke(app, ["quantize", str(model), "--group-size", "32", "--dataset", str(corpus),
                                 "--num-samples", "4", "--seq-len", "32", "--eval-dataset", str(corpus),
                                 "--eval-windows", "2", "--output", str(out), "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("extra", [("--sym",), ("--asym", "--act-order")], ids=["sym", "asym-act-order"])
def test_quantize_format_gptq_then_convert_both_ways(tiny, tmp_path, extra):
    model, corpus = tiny
    out = tmp_path / "gptq"
    payload = _quantize(model, corpus, out, "--format", "gptq", *extra)
    assert "ppl" in payload["metrics"]  # the eval of the export ran on the GPTQ folder
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant == json.loads((out / "quantize_config.json").read_text())
    assert quant["checkpoint_format"] == ("gptq" if extra[0] == "--sym" else "gptq_v2")
    # act-order keeps groups contiguous (readers refuse desc_act: true): g_idx is the trivial i // group
    assert quant["desc_act"] is False and quant["lm_head"] is False
    g_idx = load_file(out / "model.safetensors")["model.layers.0.mlp.down_proj.g_idx"]
    assert torch.equal(g_idx.long(), torch.arange(g_idx.numel()) // quant["group_size"])
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.qweight"].shape == (128 * 4 // 32, 64)
    assert not any(k.endswith("weight_packed") for k in tensors)

    ct, back = tmp_path / "ct", tmp_path / "back"
    for src, dst, to in ((out, ct, "compressed-tensors"), (ct, back, "gptq")):
        result = runner.invoke(app, ["convert", str(src), "--to", to, "--output", str(dst), "--json"])
        assert result.exit_code == 0, result.output
    assert (back / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert json.loads((back / "config.json").read_text()) == json.loads((out / "config.json").read_text())
    ids = torch.randint(0, 100, (1, 12))
    logits = [compress.load(p, kernel="reference")(ids).logits for p in (out, ct)]
    assert torch.equal(logits[0], logits[1])


def test_compressed_tensors_to_gptq_and_back_keeps_codes(tiny, tmp_path):
    """fp32 scales (from an fp32 model) become fp16 in GPTQ; codes, zero points and g_idx are untouched, and a
    second round trip from the now-fp16 checkpoint is bit-exact."""
    model, corpus = tiny
    src = tmp_path / "ct"
    _quantize(model, corpus, src, "--asym", "--act-order", "--no-eval")
    folders = [src, tmp_path / "g1", tmp_path / "c1", tmp_path / "g2", tmp_path / "c2"]
    for a, b in zip(folders, folders[1:], strict=False):
        to = "gptq" if b.name.startswith("g") else "compressed-tensors"
        result = runner.invoke(app, ["convert", str(a), "--to", to, "--output", str(b)])
        assert result.exit_code == 0, result.output
    orig, once, twice = (load_file(f / "model.safetensors") for f in (src, folders[2], folders[4]))
    assert orig.keys() == once.keys() == twice.keys()
    for name in orig:
        expected = orig[name].half() if name.endswith("weight_scale") else orig[name]
        assert torch.equal(once[name], expected), name
        assert torch.equal(twice[name], once[name]), name
    assert (folders[4] / "tokenizer.json").is_file() and (folders[4] / "manifest.json").is_file()
    recipe = (folders[1] / "recipe.yaml").read_text()
    assert "format: gptq" in recipe
    config = json.loads((folders[2] / "config.json").read_text())["quantization_config"]
    # act-order exports contiguous groups: the trivial g_idx of the GPTQ layout is dropped on the way back
    assert config["config_groups"]["group_0"]["weights"]["actorder"] != "group"
    assert not any(k.endswith("g_idx") for k in once)
    assert config["ignore"] == ["lm_head"]


def test_quantize_format_gptq_refuses_before_compute(tiny, tmp_path):
    model, corpus = tiny
    result = runner.invoke(app, ["quantize", str(model), "--format", "gptq", "--ignore", "down_proj",
                                 "--group-size", "32", "--dataset", str(corpus), "--output", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "cannot express" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()

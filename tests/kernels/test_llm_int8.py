"""LLM.int8() run-time decomposition: outlier columns exact, the rest vector-wise int8, same int8 weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.codecs import quantize_linear
from compress.core.errors import CompressError
from compress.core.scheme import QuantScheme
from compress.kernels.llm_int8 import check_threshold, is_llm_int8_scheme, llm_int8_input, outlier_columns

W8 = QuantScheme(8, -1, True)


def test_outlier_columns_stay_exact_and_the_rest_is_int8_per_token():
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    x[2, 3] = 9.0  # column 3 becomes an outlier column for every token
    x[4, 7] = -6.0  # exactly at the threshold counts (|x| >= threshold, as bitsandbytes)
    mixed = llm_int8_input(x, 6.0)
    assert outlier_columns(x, 6.0).nonzero().flatten().tolist() == [3, 7]
    assert torch.equal(mixed[:, [3, 7]], x[:, [3, 7]])
    regular = x.clone()
    regular[:, [3, 7]] = 0
    scale = regular.abs().amax(dim=1, keepdim=True) / 127
    expected = torch.clamp(torch.round(regular / scale), -127, 127) * scale
    keep = [j for j in range(16) if j not in (3, 7)]
    torch.testing.assert_close(mixed[:, keep], expected[:, keep], rtol=0, atol=1e-6)
    assert not torch.equal(mixed[:, keep], x[:, keep])  # the regular part really is quantized


def test_no_outliers_is_plain_vector_wise_int8_and_zero_rows_stay_zero():
    x = torch.tensor([[0.0, 0.0], [1.0, -0.5]])
    out = llm_int8_input(x, 6.0)
    assert torch.equal(out[0], torch.zeros(2)) and torch.isfinite(out).all()


def test_a_quantized_layer_runs_the_decomposition():
    torch.manual_seed(0)
    linear = nn.Linear(32, 8)
    layer = quantize_linear(linear, W8, format="int-quantized")
    x = torch.randn(4, 32)
    x[:, 5] *= 40
    w8a16 = layer(x)
    layer.outlier_threshold = 6.0
    mixed = layer(x)
    expected = nn.functional.linear(llm_int8_input(x, 6.0), layer.dequantized_weight(torch.float32), layer.bias)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
    assert (mixed - w8a16).abs().max() > 0  # the non-outlier inputs were rounded
    plain = quantize_linear(linear, QuantScheme.w8a8_int8(), format="int-quantized")
    err_llm = (mixed - linear(x)).norm()
    err_plain = (plain(x) - linear(x)).norm()
    assert err_llm < 0.5 * err_plain  # the 40x channel no longer sets every token's int8 step


def test_which_schemes_and_thresholds():
    assert is_llm_int8_scheme(W8) and not is_llm_int8_scheme(QuantScheme.w8a8_int8())
    assert not is_llm_int8_scheme(QuantScheme(4, 128, True)) and not is_llm_int8_scheme(QuantScheme(8, 128, True))
    assert check_threshold(6) == 6.0
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(CompressError, match="positive number"):
            check_threshold(bad)


def test_quantize_export_load_and_readers(tmp_path, tiny_llama_dir, corpus_txt):
    import json

    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    import compress
    from compress.cli.main import app
    from compress.kernels.quant_linear import QuantLinear

    runner = CliRunner()
    out = tmp_path / "llm-int8"
    result = runner.invoke(app, ["quantize", str(tiny_llama_dir), "--scheme", "llm-int8", "--threshold", "0.5",
                                 "--dataset", str(corpus_txt), "--eval-windows", "2", "--output", str(out), "--json"])
    assert result.exit_code == 0, result.output
    block = json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8"]
    assert block["threshold"] == 0.5 and len(block["targets"]) == 14
    ours = compress.load(out, device="cpu")
    layers = [m for m in ours.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.outlier_threshold == 0.5 for m in layers)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    theirs = AutoModelForCausalLM.from_pretrained(str(out))  # compressed-tensors ignores the key: W8A16
    with torch.no_grad():
        mixed = ours(ids).logits
        for layer in layers:
            layer.outlier_threshold = None
        w8a16 = ours(ids).logits
        reader = theirs(ids).logits
    torch.testing.assert_close(reader, w8a16, rtol=0, atol=1e-5)
    assert (mixed - w8a16).abs().max() > 1e-5  # compress.load really runs the decomposition


@pytest.mark.parametrize(("flags", "needle"), [
    (["--threshold", "6"], "add --scheme llm-int8"),
    (["--scheme", "llm-int8", "--threshold", "-1"], "threshold"),
    (["--scheme", "llm-int8", "--bits", "4"], "8-bit symmetric per-channel"),
    (["--scheme", "llm-int8", "--format", "gptq"], "GPTQ layout"),
])
def test_cli_refusals(flags, needle, tmp_path):
    from typer.testing import CliRunner

    from compress.cli.main import app

    result = CliRunner().invoke(app, ["quantize", str(tmp_path / "missing"), *flags, "--no-eval", "--output",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2 and needle in result.output and not (tmp_path / "out").exists()

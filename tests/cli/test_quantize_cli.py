"""`compress quantize` / `eval` / `inspect` / `run` end to end on tiny models: outputs, JSON, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import compress
from compress.cli.main import app
from compress.export.manifest import sha256_file
from compress.kernels.quant_linear import QuantLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    words = "the quick brown fox jumps over the lazy dog and a small model learns the next word".split()
    lines = [" ".join(words[(i * 7) % len(words):] + words[: (i * 7) % len(words)]) for i in range(200)]
    path.write_text("\n\n".join(lines))
    return path


def quantize_args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(model), "--group-size", "32", "--dataset", str(corpus), "--num-samples", "4",
            "--seq-len", "32", "--eval-dataset", str(corpus), "--output", str(out), "--json", *extra]


def invoke(args: list[str]):
    result = runner.invoke(app, args)
    return result


@pytest.fixture(scope="module")
def w4_output(llama_dir, corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("outputs") / "w4"
    result = invoke(quantize_args(llama_dir, corpus, out))
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_quantize_writes_a_complete_artifact(w4_output):
    out, payload = w4_output
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "recipe.yaml", "manifest.json", "report.json",
            "tokenizer.json"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".w4.tmp")]
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, True)
    assert "lm_head" in quant["ignore"]
    assert payload["output"] == str(out)
    assert payload["layers"] == 14
    for key in ("ppl", "baseline_ppl", "ppl_increase", "kl", "top1"):
        assert key in payload["metrics"]
    assert payload["metrics"]["kl"] > 0
    assert payload["size_after_bytes"] < payload["size_before_bytes"]


def test_manifest_hashes_every_file(w4_output):
    out, _ = w4_output
    manifest = json.loads((out / "manifest.json").read_text())
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(out / rel)
    assert manifest["calibration"]["fingerprint"]
    assert manifest["recipe"]["stages"][0]["bits"] == 4


def test_load_returns_packed_layers_matching_the_in_memory_quantization(w4_output, llama_dir):
    out, payload = w4_output
    model = compress.load(out, kernel="reference")  # the path eval uses
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 14
    assert all(m.weight_packed.dtype == torch.int32 for m in quantized)
    assert not any(hasattr(m, "weight") and isinstance(getattr(m, "weight", None), torch.nn.Parameter)
                   for m in quantized)
    ids = torch.randint(0, 100, (2, 16))
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    # same weights → same perplexity as the eval that ran on the export
    from compress.calibrate.data import eval_windows
    from compress.evaluate.metrics import perplexity
    from compress.models.load import load_tokenizer

    recipe = json.loads((out / "manifest.json").read_text())["recipe"]
    windows = eval_windows(load_tokenizer(str(out)), recipe["eval"]["dataset"], payload["metrics"]["seq_len"])
    assert perplexity(model, windows).ppl == pytest.approx(payload["metrics"]["ppl"], rel=1e-5)


def test_eval_with_baseline_and_gate(w4_output, llama_dir, corpus):
    out, _ = w4_output
    result = invoke(["eval", str(out), "--baseline", str(llama_dir), "--dataset", str(corpus), "--seq-len", "32",
                     "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["kl"] > 0 and 0 < metrics["top1"] <= 1
    assert metrics["compression_ratio"] > 1
    gated = invoke(["eval", str(out), "--baseline", str(llama_dir), "--dataset", str(corpus), "--seq-len", "32",
                    "--max-ppl-increase", "0", "--json"])
    if metrics["ppl_increase"] > 0:
        assert gated.exit_code == 3
        assert "exceeds --max-ppl-increase" in gated.stderr


def test_inspect_reports_layers_and_sizes(w4_output):
    out, _ = w4_output
    result = invoke(["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["layers"]) == 14
    layer = report["layers"][0]
    assert layer["scheme"] == "w4g32"
    # 4 bits of codes plus one 32-bit scale per 32 weights (fp32 model → fp32 scales) = 5 bits per weight
    assert 4.0 < layer["bits_per_weight"] <= 5.0 + 1e-6
    assert report["bytes_by_component"]["quantized weights"] > 0


def test_dry_run_loads_no_weights_and_writes_nothing(llama_dir, corpus, tmp_path):
    out = tmp_path / "dry"
    result = invoke(quantize_args(llama_dir, corpus, out, "--dry-run"))
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["dry_run"] is True
    assert len(plan["stages"][0]["layers"]) == 14
    assert plan["recipe"]["stages"][0]["group_size"] == 32
    assert not out.exists()


def test_run_recipe_with_set_override(llama_dir, corpus, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {llama_dir}\ncalibration: {{dataset: '{corpus}', num_samples: 2, seq_len: 32}}\n"
                      f"eval: {{enabled: false}}\nstages:\n  - method: rtn\n    bits: 4\n    group_size: 64\n")
    out = tmp_path / "run-out"
    result = invoke(["run", str(recipe), "--set", "stages.0.bits=8", "--output", str(out), "--json"])
    assert result.exit_code == 0, result.output
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert weights["weights"]["num_bits"] == 8
    assert "bits: 8" in (out / "recipe.yaml").read_text()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing-model", "does not exist"),
        ("bad-bits", "--bits"),
        ("group-size", "not divisible by group size"),
        ("short-data", "fewer than one sample"),
        ("empty-data", "empty"),
        ("no-weights", "no weights"),
    ],
)
def test_bad_input_exits_2_with_one_sentence_and_no_output(case, message, llama_dir, corpus, tmp_path):
    out = tmp_path / "out"
    model, data, extra = llama_dir, corpus, []
    if case == "missing-model":
        model = tmp_path / "absent-model"
    elif case == "bad-bits":
        extra = ["--bits", "5"]
    elif case == "group-size":
        extra = ["--group-size", "48"]
    elif case == "short-data":
        data = tmp_path / "short.txt"
        data.write_text("the dog")
    elif case == "empty-data":
        data = tmp_path / "empty.txt"
        data.write_text("")
    elif case == "no-weights":
        model = tmp_path / "no-weights"
        model.mkdir()
        (model / "config.json").write_text((llama_dir / "config.json").read_text())
    result = invoke(quantize_args(model, data, out, *extra))
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_existing_output_needs_overwrite(llama_dir, corpus, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke(quantize_args(llama_dir, corpus, out, "--no-eval"))
    assert result.exit_code == 2
    assert "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only a previous output of compress (issue 9), never a folder of the user's files
    result = invoke(quantize_args(llama_dir, corpus, out, "--no-eval", "--overwrite"))
    assert result.exit_code == 2 and "not a previous output of compress" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert invoke(quantize_args(llama_dir, corpus, out, "--no-eval", "--method", "rtn")).exit_code == 0
    result = invoke(quantize_args(llama_dir, corpus, out, "--no-eval", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists() and "gptq" in (out / "recipe.yaml").read_text()


def test_help_does_not_import_torch():
    code = "import sys; from compress.cli.main import app; print('torch' in sys.modules)"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == "False"


def test_recipes_list_and_show():
    listed = invoke(["recipes", "list", "--json"])
    assert listed.exit_code == 0
    assert {"w4a16-rtn", "w8a16-rtn"} <= set(json.loads(listed.stdout)["recipes"])
    shown = invoke(["recipes", "show", "w8a16-rtn"])
    assert shown.exit_code == 0 and "bits: 8" in shown.stdout
    missing = invoke(["recipes", "show", "nope"])
    assert missing.exit_code == 2 and "no built-in recipe" in missing.stderr


def test_same_recipe_twice_gives_identical_bytes(llama_dir, corpus, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        result = invoke(quantize_args(llama_dir, corpus, out, "--asym", "--seed", "3"))
        assert result.exit_code == 0, result.output
    for name in ("model.safetensors", "config.json", "manifest.json", "report.json", "recipe.yaml"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_requantizing_a_compressed_checkpoint_is_refused(w4_output, corpus, tmp_path):
    out, _ = w4_output
    result = invoke(quantize_args(out, corpus, tmp_path / "again"))
    assert result.exit_code == 2
    assert "already a compressed checkpoint" in result.stderr


def test_indivisible_group_size_can_fall_back_to_per_channel(llama_dir, corpus, tmp_path):
    out = tmp_path / "fallback"
    # group 48 divides no width of the tiny model (64, 128): every layer falls back to per-channel
    result = invoke(quantize_args(llama_dir, corpus, out, "--group-size", "48", "--indivisible", "per-channel",
                                  "--no-eval"))
    assert result.exit_code == 0, result.output
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert weights["weights"]["strategy"] == "channel"
    assert compress.load(out) is not None


def test_ctrl_c_leaves_no_output(llama_dir, corpus, tmp_path, monkeypatch):
    from compress.passes.quantize import gptq

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gptq, "gptq_quantize", interrupted)
    out = tmp_path / "interrupted"
    result = invoke(quantize_args(llama_dir, corpus, out, "--no-eval"))
    assert result.exit_code == 130
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_mixed_schemes_export_as_several_config_groups(llama_dir, corpus, tmp_path):
    out = tmp_path / "mixed"
    # group 128 fits down_proj (128 inputs) but not the 64-input layers, which fall back to per-channel
    result = invoke(quantize_args(llama_dir, corpus, out, "--group-size", "128", "--indivisible", "per-channel",
                                  "--no-eval", "--method", "rtn"))
    assert result.exit_code == 0, result.output
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    strategies = sorted(g["weights"]["strategy"] for g in groups.values())
    assert strategies == ["channel", "group"]
    assert all(t.startswith("re:") for g in groups.values() for t in g["targets"])
    report = json.loads(invoke(["inspect", str(out), "--json"]).stdout)
    schemes = {layer["name"].rsplit(".", 1)[-1]: layer["scheme"] for layer in report["layers"]}
    assert schemes["down_proj"] == "w4g128" and schemes["q_proj"] == "w4"
    loaded = compress.load(out)
    assert loaded.get_submodule("model.layers.0.mlp.down_proj").scheme.group_size == 128
    assert loaded.get_submodule("model.layers.0.self_attn.q_proj").scheme.group_size == -1


def test_method_flag_starts_from_that_methods_preset(llama_dir, corpus, tmp_path):
    """``--method rtn`` means RTN's defaults (min/max scales, as ``--help`` says), not GPTQ's preset with the
    method swapped (which kept the MSE clipping search); an explicit ``--observer`` still wins."""
    def stage(*extra: str) -> dict:
        result = invoke(quantize_args(llama_dir, corpus, tmp_path / "dry", "--dry-run", *extra))
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["recipe"]["stages"][0]

    assert stage("--method", "rtn")["observer"] == "minmax"
    assert stage("--method", "rtn", "--observer", "mse")["observer"] == "mse"
    assert stage()["observer"] == "auto" and stage()["act_order"] is True  # the default gptq preset

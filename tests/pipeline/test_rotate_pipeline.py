"""``--rotate hadamard`` through the real pipeline: the export is an ordinary checkpoint of the same
architecture (``compress.load`` and transformers + compressed-tensors read it and compute what the in-memory
model computed), tied heads are untied and said so, the records and the card name the rotation, a streamed
run writes the bytes of an eager one, rotate composes with awq and gptq, and bad input exits 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

import compress
from compress.cli.main import app
from compress.models.load import load_model
from compress.pipeline.engine import compress_model
from compress.recipes.loader import recipe_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import VOCAB_SIZE, build_tokenizer, save_tiny, tiny_config, write_rotated_corpus  # noqa: E402

runner = CliRunner()
IDS = torch.randint(4, VOCAB_SIZE, (2, 24), generator=torch.Generator().manual_seed(0))


def _save_tied(folder: Path) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("qwen2")
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand_like(param) + 0.5)
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory) -> Path:
    return _save_tied(tmp_path_factory.mktemp("models") / "tied-qwen2")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_rotated_corpus(tmp_path_factory.mktemp("data") / "calib.txt")


@pytest.fixture(scope="module")
def rtn_export(tied_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "rot-rtn"
    result = runner.invoke(app, ["quantize", str(tied_dir), "--rotate", "hadamard", "--method", "rtn",
                                 "--group-size", "32", "--no-eval", "--output", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def test_export_loads_and_computes_what_the_in_memory_model_computed(tied_dir, rtn_export):
    out, payload = rtn_export
    loaded = load_model(str(tied_dir))
    stages = [{"method": "rotate"}, {"method": "rtn", "bits": 4, "group_size": 32}]
    in_memory, _ = compress_model(loaded.model, stages)
    expected = _logits(in_memory)
    ours = compress.load(out, device="cpu", kernel="reference")
    assert torch.allclose(_logits(ours), expected, atol=1e-5, rtol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["model_type"] == "qwen2"
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" in handle.keys()
        assert not torch.equal(handle.get_tensor("lm_head.weight"), handle.get_tensor("model.embed_tokens.weight"))
    assert any("tie_word_embeddings: false" in note for note in payload["notes"])
    assert payload["layers"] == 14


def test_transformers_with_compressed_tensors_reads_the_rotated_checkpoint(rtn_export):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    out, _ = rtn_export
    hf_logging.set_verbosity_error()
    theirs = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(theirs).__name__ == "Qwen2ForCausalLM"
    ours = compress.load(out, device="cpu", kernel="reference")
    assert torch.allclose(_logits(theirs), _logits(ours), atol=1e-4, rtol=1e-4)


def test_records_manifest_and_card_name_the_rotation(rtn_export):
    out, _ = rtn_export
    layers = json.loads((out / "manifest.json").read_text())["layers"]
    assert len(layers) == 14 and all(layer["methods"] == ["rotate", "rtn"] for layer in layers)
    card = (out / "README.md").read_text()
    assert "| 0 | rotate | hadamard (14) |" in card and "| 1 | rtn |" in card
    stages = yaml.safe_load((out / "recipe.yaml").read_text())["stages"]
    assert stages[0] == {"method": "rotate", "ignore": [], "kind": "hadamard", "seed": 0}


def test_rotation_alone_keeps_the_model(tied_dir, tmp_path):
    """A rotate-only recipe writes a dense checkpoint of the same function (nothing quantized)."""
    recipe = recipe_from_dict({"model": str(tied_dir), "eval": {"enabled": False}, "stages": [{"method": "rotate"}]})
    compress.run(recipe, tmp_path / "out")
    original = _logits(load_model(str(tied_dir)).model)
    rotated = _logits(compress.load(tmp_path / "out", device="cpu"))
    assert (rotated - original).abs().max() <= 1e-4 * original.abs().max()


def test_streamed_and_eager_rotated_runs_write_the_same_bytes(corpus, tmp_path):
    folder = save_tiny("llama", tmp_path / "llama")
    written = []
    for stream in (True, False):
        recipe = recipe_from_dict({
            "model": str(folder), "stream": stream, "eval": {"enabled": False},
            "calibration": {"dataset": str(corpus), "num_samples": 4, "seq_len": 32},
            "stages": [{"method": "rotate", "seed": 3}, {"method": "gptq", "bits": 4, "group_size": 32}]})
        compress.run(recipe, tmp_path / f"out-{stream}")
        written.append((tmp_path / f"out-{stream}" / "model.safetensors").read_bytes())
    assert written[0] == written[1]


@pytest.mark.parametrize("stages", [
    [{"method": "rotate"}, {"method": "awq", "quantize": False, "group_size": 32},
     {"method": "gptq", "group_size": 32}],
    [{"method": "rotate"}, {"method": "awq", "group_size": 32}],
])
def test_rotate_composes_with_awq_and_gptq(stages, corpus, tmp_path):
    folder = save_tiny("llama", tmp_path / "llama")
    recipe = recipe_from_dict({"model": str(folder), "eval": {"max_windows": 4, "dataset": str(corpus)},
                               "calibration": {"dataset": str(corpus), "num_samples": 4, "seq_len": 32},
                               "stages": stages})
    result = compress.run(recipe, tmp_path / "out")
    assert result.layers == 14 and 0 <= result.metrics["kl"] < 1.0
    methods = {tuple(layer["methods"]) for layer in json.loads((tmp_path / "out" / "manifest.json").read_text())["layers"]}
    assert methods == {tuple(s["method"] for s in stages)}


# ---- bad input: exit 2, one sentence, nothing written, no weights read ----------------------------------
@pytest.fixture
def no_weights(monkeypatch):
    import compress.pipeline.run as run_module

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was refused")

    monkeypatch.setattr(run_module, "_load", refuse)


def _refused(result, out: Path, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize("dry", [False, True])
def test_rotate_on_an_unsupported_family_is_refused(tmp_path, no_weights, dry):
    folder = save_tiny("opt", tmp_path / "opt")
    out = tmp_path / "out"
    result = runner.invoke(app, ["quantize", str(folder), "--rotate", "hadamard", "--method", "rtn",
                                 "--group-size", "32", "--output", str(out), *(["--dry-run"] if dry else [])])
    _refused(result, out, "rotate does not support opt", "LayerNorm")


def test_unknown_rotation_kind_is_refused(tmp_path, no_weights):
    out = tmp_path / "out"
    result = runner.invoke(app, ["quantize", "--rotate", "givens", "--method", "rtn", "--output", str(out)])
    _refused(result, out, "unknown --rotate 'givens'", "hadamard")


@pytest.mark.parametrize("how", ["flag", "recipe"])
def test_online_rotation_is_refused_with_the_reason(tmp_path, no_weights, how):
    """transformers applies no compressed-tensors transform_config: an online rotation would load as another
    model, so it is refused in one sentence, by flag and in a recipe."""
    out = tmp_path / "out"
    if how == "flag":
        result = runner.invoke(app, ["quantize", "--rotate", "online", "--method", "rtn", "--output", str(out)])
    else:
        recipe = tmp_path / "online.yaml"
        recipe.write_text(yaml.safe_dump({"stages": [{"method": "rotate", "kind": "hadamard-online"},
                                                     {"method": "rtn"}]}))
        result = runner.invoke(app, ["run", str(recipe), "--output", str(out)])
    _refused(result, out, "online rotations", "--rotate hadamard")


def test_rotate_after_quantize_is_refused(tmp_path, no_weights):
    recipe = tmp_path / "late.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [{"method": "rtn"}, {"method": "rotate"}]}))
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(recipe), "--output", str(out)])
    _refused(result, out, "stage 1 (rotate)", "put rotate before it")


def test_rotate_stage_with_unknown_kind_in_a_recipe_is_refused(tmp_path, no_weights):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [{"method": "rotate", "kind": "spin"}, {"method": "rtn"}]}))
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(recipe), "--output", str(out)])
    _refused(result, out, "stages.0.kind", "hadamard")


def test_a_recipe_starting_with_rotate_keeps_it_under_stage_flags(tmp_path, corpus):
    """``compress quantize --recipe R --method rtn --bits 4``: the flags go to R's quantize stage only."""
    recipe = tmp_path / "rot.yaml"
    recipe.write_text(yaml.safe_dump({"stages": [{"method": "rotate", "seed": 7}, {"method": "gptq"}]}))
    result = runner.invoke(app, ["quantize", save_tiny("llama", tmp_path / "m").as_posix(), "--recipe", str(recipe),
                                 "--method", "rtn", "--group-size", "32", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    stages = json.loads(result.stdout)["recipe"]["stages"]
    assert [s["method"] for s in stages] == ["rotate", "rtn"] and stages[0]["seed"] == 7
    assert stages[1]["group_size"] == 32


def test_interrupted_rotated_run_resumes_to_the_same_bytes(corpus, tmp_path):
    """``start`` rotates the embedding and head again on the fresh model; finished blocks come back rotated."""
    folder = _save_tied(tmp_path / "tied")
    recipe = recipe_from_dict({
        "model": str(folder), "eval": {"enabled": False},
        "calibration": {"dataset": str(corpus), "num_samples": 4, "seq_len": 32},
        "stages": [{"method": "rotate"}, {"method": "gptq", "bits": 4, "group_size": 32}]})
    compress.run(recipe, tmp_path / "straight")

    def interrupt(label, done, total):
        if done == 1 and label != "capture inputs" and "block" in label:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress.run(recipe, tmp_path / "resumed", resume=True, progress=interrupt)
    compress.run(recipe, tmp_path / "resumed", resume=True)
    for name in ("model.safetensors", "config.json", "manifest.json"):
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_rotated_gptq_layout_export(tmp_path, corpus):
    folder = save_tiny("llama", tmp_path / "llama")
    out = tmp_path / "out"
    result = runner.invoke(app, ["quantize", str(folder), "--rotate", "hadamard", "--method", "gptq", "--group-size",
                                 "32", "--format", "gptq", "--dataset", str(corpus), "--num-samples", "4",
                                 "--seq-len", "32", "--no-eval", "--output", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert compress.load(out, device="cpu")(IDS).logits.isfinite().all()


def test_method_rotate_is_not_a_quantizer(tmp_path, no_weights):
    out = tmp_path / "out"
    result = runner.invoke(app, ["quantize", "--method", "rotate", "--output", str(out)])
    _refused(result, out, "--rotate hadamard")

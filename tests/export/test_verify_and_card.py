"""``compress verify`` and the model card: a release folder explains itself and detects any change."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli.main import app
from compress.export.manifest import verify_manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("release")
    model = save_tiny("llama", root / "tiny-llama")
    corpus = root / "calib.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(120)))
    out = root / "out"
    result = runner.invoke(app, ["quantize", str(model), "--method", "rtn", "--group-size", "32", "--dataset",
                                 str(corpus), "--num-samples", "2", "--seq-len", "16", "--eval-dataset", str(corpus),
                                 "--eval-windows", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def copy(release, tmp_path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(release, folder)
    return folder


def test_verify_passes_on_a_fresh_release(release):
    result = runner.invoke(app, ["verify", str(release), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["ok"] is True and payload["problems"] == []
    assert payload["files_checked"] == len([p for p in release.iterdir() if p.name != "manifest.json"])


@pytest.mark.parametrize(("change", "problem", "name"), [
    ("edit", "changed", "config.json"),
    ("delete", "missing", "tokenizer.json"),
    ("add", "extra", "evil.bin"),
    ("edit-card", "changed", "README.md"),
])
def test_verify_exits_1_naming_the_file(copy, change, problem, name):
    if change == "edit":
        (copy / name).write_text((copy / name).read_text().replace("64", "65", 1))
    elif change == "delete":
        (copy / name).unlink()
    elif change == "add":
        (copy / name).write_bytes(b"\x80\x04not a model")
    else:
        (copy / name).write_text((copy / name).read_text() + "\nbetter than the original!\n")
    result = runner.invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1, result.output
    assert name in result.stderr and "Traceback" not in result.output
    assert [p["problem"] for p in verify_manifest(copy)] == [problem]


def test_verify_without_a_readable_manifest_is_bad_input(copy):
    (copy / "manifest.json").write_text("{not json")
    result = runner.invoke(app, ["verify", str(copy)])
    assert result.exit_code == 2 and "not a readable JSON manifest" in result.stderr
    (copy / "manifest.json").unlink()
    result = runner.invoke(app, ["verify", str(copy), "--json"])
    assert result.exit_code == 2 and json.loads(result.stdout)["exit_code"] == 2
    assert "no manifest.json" in result.stderr


def test_verify_never_reads_outside_the_folder(copy, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["../secret.txt"] = {"sha256": "0" * 64, "bytes": 6}
    manifest["files"][str(outside)] = {"sha256": "0" * 64, "bytes": 6}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_manifest(copy)
    assert sorted(p["problem"] for p in problems) == ["outside", "outside"]


def test_card_says_what_was_done_and_is_hashed(release):
    card = (release / "README.md").read_text()
    manifest = json.loads((release / "manifest.json").read_text())
    assert "README.md" in manifest["files"]
    assert "| 0 | rtn | w4g32 (14) | 14 |" in card
    assert "compress.load(" in card and "vllm serve" in card and "from_pretrained" in card
    assert "| perplexity increase |" in card and "| compression ratio (bytes before / after) |" in card
    assert str(release) not in card  # the output path never enters a hashed file


@pytest.mark.parametrize(("layout", "says"), [
    ("pack-quantized", "compressed-tensors `pack-quantized` layout"),
    ("sparse-bitmask", "Only `compress.load` decodes it"),
    ("gptq", "GPTQ layout"),
    ("dense", "plain transformers checkpoint"),
])
def test_card_describes_the_layout_it_was_written_in(layout, says):
    from compress.export.card import render_card

    recipe = {"stages": [{"method": "structured", "target": "channels", "ratio": 0.25}]}
    card = render_card(source_model="m", recipe=recipe, calibration=None, evaluation=None, records=[],
                       tool_version="0", layout=layout)
    assert says in card and "# m, compressed (structured)" in card
    assert "vllm serve" not in card  # no quantized 4/8-bit weights: no claim that vLLM serves it
    assert "not evaluated" in card
    assert card == render_card(source_model="m", recipe=recipe, calibration=None, evaluation=None, records=[],
                               tool_version="0", layout=layout)


@pytest.mark.parametrize(("stage", "claims_vllm"), [
    ({"method": "gptq", "bits": 4, "group_size": 128, "symmetric": True}, True),
    ({"method": "gptq", "bits": 3, "group_size": 128, "symmetric": True}, False),
    ({"method": "rtn", "bits": 4, "group_size": 128, "symmetric": False}, False),
])
def test_card_claims_vllm_only_for_what_it_serves(stage, claims_vllm):
    from compress.export.card import render_card

    card = render_card(source_model="m", recipe={"stages": [stage]}, calibration=None, evaluation=None,
                       records=[], tool_version="0", layout="pack-quantized")
    assert ("vllm serve" in card) is claims_vllm
    assert ("CompressedTensorsConfig(dequantize=True)" in card) is (stage["symmetric"] is False)

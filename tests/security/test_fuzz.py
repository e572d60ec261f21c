"""Property tests: random and mutated bytes into the checkpoint reader and the recipe loader.

The property is the CLI's contract: whatever the bytes, ``compress.load`` and ``load_recipe`` either
succeed or raise ``CompressError`` (one sentence, exit 2), never another exception (exit 1, a "bug").
Kept small (a few dozen examples per target, no deadline) so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import compress
from compress.cli.main import app
from compress.core.errors import CompressError
from compress.recipes.loader import load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny  # noqa: E402

FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# (position as a fraction of the file, replacement bytes); truncation and insertion as special cases
mutation = st.one_of(
    st.tuples(st.just("replace"), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(b"")),
)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-4, 300) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def mutate(data: bytes, mutations: list[tuple[str, float, bytes]], head: int | None = None) -> bytes:
    """Apply mutations at positions within the first ``head`` bytes (the header, where parsing happens)."""
    for kind, where, payload in mutations:
        span = min(len(data), head) if head else len(data)
        at = int(where * span)
        if kind == "replace":
            data = data[:at] + payload + data[at + len(payload):]
        elif kind == "insert":
            data = data[:at] + payload + data[at:]
        else:
            data = data[:at]
    return data


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    model = save_tiny("llama", root / "llama")
    corpus = root / "c.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(80)))
    out = root / "w4"
    result = CliRunner().invoke(app, ["quantize", str(model), "--method", "rtn", "--group-size", "32", "--asym",
                                      "--no-eval", "--dataset", str(corpus), "--num-samples", "2", "--seq-len", "16",
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out


def load_or_refuse(folder: Path) -> None:
    """The property: success or CompressError, nothing else."""
    try:
        compress.load(folder, device="cpu", kernel="reference")
    except CompressError as error:
        assert "\n" not in str(error)


def _copy(checkpoint: Path, scratch: str) -> Path:
    folder = Path(scratch) / "ckpt"
    shutil.copytree(checkpoint, folder)
    return folder


@FAST
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_config_json(checkpoint, mutations):
    with tempfile.TemporaryDirectory() as scratch:
        folder = _copy(checkpoint, scratch)
        path = folder / "config.json"
        path.write_bytes(mutate(path.read_bytes(), mutations))
        load_or_refuse(folder)


@FAST
@given(key=st.sampled_from(["hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                            "num_hidden_layers", "intermediate_size", "architectures", "model_type",
                            "quantization_config", "head_dim", "rope_parameters", "tie_word_embeddings"]),
       value=json_value, group_field=st.sampled_from(["num_bits", "group_size", "strategy", "symmetric",
                                                      "type", "actorder", "targets"]),
       group_value=json_value)
def test_config_values_replaced(checkpoint, key, value, group_field, group_value):
    with tempfile.TemporaryDirectory() as scratch:
        folder = _copy(checkpoint, scratch)
        config = json.loads((folder / "config.json").read_text())
        config[key] = value
        if isinstance(config.get("quantization_config"), dict):
            groups = config["quantization_config"].get("config_groups", {}).get("group_0", {})
            target = groups.get("weights", groups) if group_field != "targets" else groups
            if isinstance(target, dict):
                target[group_field] = group_value
        (folder / "config.json").write_text(json.dumps(config))
        load_or_refuse(folder)


@FAST
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_safetensors_header(checkpoint, mutations):
    with tempfile.TemporaryDirectory() as scratch:
        folder = _copy(checkpoint, scratch)
        path = folder / "model.safetensors"
        data = path.read_bytes()
        head = 8 + int.from_bytes(data[:8], "little")
        path.write_bytes(mutate(data, mutations, head=head))
        load_or_refuse(folder)


@FAST
@given(data=st.binary(max_size=256))
def test_random_bytes_as_safetensors(checkpoint, data):
    with tempfile.TemporaryDirectory() as scratch:
        folder = _copy(checkpoint, scratch)
        (folder / "model.safetensors").write_bytes(data)
        load_or_refuse(folder)


@FAST
@given(mutations=st.lists(mutation, min_size=1, max_size=3), entry=json_value)
def test_mutated_shard_index(checkpoint, mutations, entry):
    with tempfile.TemporaryDirectory() as scratch:
        folder = _copy(checkpoint, scratch)
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        from safetensors import safe_open

        with safe_open(str(folder / "model-00001-of-00001.safetensors"), "pt") as handle:
            weight_map = {k: "model-00001-of-00001.safetensors" for k in handle.keys()}  # noqa: SIM118
        weight_map["lm_head.weight"] = entry
        text = json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}).encode()
        (folder / "model.safetensors.index.json").write_bytes(mutate(text, mutations))
        load_or_refuse(folder)


RECIPE = (Path(__file__).resolve().parents[2] / "src/compress/recipes/presets/w4a16-gptq.yaml").read_bytes()


def load_recipe_or_refuse(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "recipe.yaml"
        path.write_bytes(text)
        try:
            load_recipe(str(path))
        except CompressError as error:
            assert "\n" not in str(error)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(mutations=st.lists(mutation, min_size=1, max_size=5))
def test_mutated_recipe_yaml(mutations):
    load_recipe_or_refuse(mutate(RECIPE, mutations))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(text=st.text(max_size=200))
def test_random_text_as_recipe(text):
    load_recipe_or_refuse(text.encode("utf-8", "surrogatepass"))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(data=st.dictionaries(st.sampled_from(["model", "stages", "calibration", "eval", "export", "dtype", "device",
                                             "output", "stream", "allow_pickle"]), json_value, max_size=5),
       stage=st.dictionaries(st.sampled_from(["method", "bits", "group_size", "symmetric", "ignore", "damp",
                                              "act_order", "observer", "sparsity", "pattern"]), json_value,
                             max_size=5))
def test_structured_recipe_values(data, stage):
    data.setdefault("stages", [{"method": "gptq", **stage}])
    load_recipe_or_refuse(yaml.safe_dump(data).encode())


@pytest.mark.parametrize("text", [
    "[" * 5000,  # nesting deeper than the parser's recursion limit
    "a: &a [*a, *a]\n",  # a self-referencing alias
    "stages: !!python/object/apply:os.system ['echo pwned']\n",  # an object constructor: safe_load refuses it
    "\ufeffstages: []\n",
], ids=["deep-nesting", "self-alias", "python-object", "bom"])
def test_hostile_yaml(text):
    load_recipe_or_refuse(text.encode())

"""The exported quantization_config names the observer that chose the scales (GPTQ defaults to auto, which
stores the observer it kept per layer: minmax or mse)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import compress
from compress.recipes.loader import recipe_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tiny import save_tiny  # noqa: E402


@pytest.mark.parametrize(("stage", "observer"), [({"method": "gptq"}, {"minmax", "mse"}),
                                                 ({"method": "gptq", "observer": "mse"}, {"mse"}),
                                                 ({"method": "rtn"}, "minmax"),
                                                 ({"method": "rtn", "observer": "mse"}, "mse")])
def test_observer_recorded(stage: dict, observer: str | set[str], tmp_path: Path) -> None:
    model_dir = save_tiny("llama", tmp_path / "llama")
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(60)))
    recipe = recipe_from_dict({"model": str(model_dir), "eval": {"enabled": False},
                               "calibration": {"dataset": str(corpus), "num_samples": 4, "seq_len": 32},
                               "stages": [{**stage, "bits": 4, "group_size": 32}]})
    compress.run(recipe, tmp_path / "out")
    groups = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["config_groups"]
    stored = {g["weights"]["observer"] for g in groups.values()}
    assert stored and stored <= (observer if isinstance(observer, set) else {observer})

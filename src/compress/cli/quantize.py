"""``compress quantize``: sugar for a one-stage quantization Recipe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from compress.cli._kv_cache import kv_cache_overrides
from compress.cli._lowrank import compensation_rank, lowrank_arguments
from compress.cli._params import shown
from compress.cli._rotate import rotation_overrides
from compress.cli._smoothquant import smoothquant_overrides
from compress.cli.common import (
    ALLOW_PICKLE,
    AS_JSON,
    DATASET,
    DEVICE,
    DO_EVAL,
    DOC_SEPARATOR,
    DRY_RUN,
    DTYPE,
    EVAL_DATASET,
    EVAL_SEQ_LEN,
    EVAL_WINDOWS,
    MAX_PPL_INCREASE,
    MIN_COMPRESSION_RATIO,
    NUM_SAMPLES,
    OUTPUT,
    OVERWRITE,
    RESUME,
    SEED,
    SEQ_LEN,
    TRUST_REMOTE_CODE,
    execute_recipe,
    job_flags,
)
from compress.cli.errors import handle_errors


@handle_errors
def quantize(
    model: str | None = typer.Argument(None, help="Local folder or hub id; omitted: the embedded demo model."),
    method: str | None = typer.Option(None, help=shown("Quantization method: gptq, rtn, awq, hqq (no data) or "
                                                       "autoround.", "gptq")),
    bits: int | None = typer.Option(None, help=shown("Weight bits: 2, 3, 4 or 8.", "4")),
    group_size: int | None = typer.Option(None, help=shown("Input columns per scale: 32, 64, 128, ... or -1 per "
                                                           "channel.", "128")),
    indivisible: str | None = typer.Option(None, help=shown("Layers the group size does not divide: error or "
                                                            "per-channel (quantize those layers per channel).",
                                                            "error")),
    sym: bool | None = typer.Option(None, "--sym/--asym", help=shown("Symmetric, or asymmetric with zero points.",
                                                                     "--sym")),
    act_order: bool | None = typer.Option(None, "--act-order/--no-act-order",
                                          help=shown("GPTQ: quantize columns by descending Hessian diagonal.",
                                                     "--act-order for gptq")),
    damp: float | None = typer.Option(None, help=shown("GPTQ: dampening, a fraction of the mean Hessian "
                                                       "diagonal.", "0.01")),
    block_size: int | None = typer.Option(None, help=shown("GPTQ: columns per lazy-update block.", "128")),
    static_groups: bool | None = typer.Option(None, "--static-groups/--no-static-groups",
                                              help=shown("GPTQ: compute all group scales before the column sweep "
                                                         "(always on with --act-order).",
                                                         "--static-groups for gptq's --act-order")),
    observer: str | None = typer.Option(None, help=shown("Scale search: minmax, mse (clipping search), imatrix (mse "
                                                         "weighted by mean squared input activation; rtn, gptq) or "
                                                         "auto (gptq: per layer, lowest output error).",
                                                         "auto for gptq, minmax for rtn")),
    ignore: list[str] | None = typer.Option(None, help=shown("Layer name pattern to leave dense (repeatable).",
                                                             "lm_head")),
    scheme: str | None = typer.Option(None, "--scheme", help="Named weight + activation scheme: w8a8-int8 (int8 "
                                      "per-channel weights, int8 per-token dynamic inputs, int-quantized), w4a8 "
                                      "(int4 weights in groups of --group-size, 128 by default, int8 per-token "
                                      "dynamic inputs, pack-quantized), fp8 (e4m3 per-channel weights, 16-bit "
                                      "inputs, float-quantized) or w8a8-fp8 (e4m3 weights and e4m3 inputs; see "
                                      "--static)."),
    threshold: float | None = typer.Option(None, "--threshold", help=shown(
        "llm-int8: input magnitude from which a feature dimension is computed in float (LLM.int8() outliers).",
        "6.0")),
    static: bool | None = typer.Option(None, "--static/--dynamic",
                                       help=shown("w8a8-fp8: one calibrated input scale per layer (--static, reads "
                                                  "the calibration data) or per-token scales at run time.",
                                                  "--dynamic")),
    lowrank_compensate: int | None = typer.Option(None, "--lowrank-compensate", metavar="RANK",
                                                  help="Add rank-RANK factors of each layer's quantization error, "
                                                  "fitted on the calibration inputs (EoRA), as a PEFT adapter in "
                                                  "lowrank/; layer-wise quantizers (rtn, gptq, hqq)."),
    lorc_rank: int | None = typer.Option(None, "--lorc-rank", metavar="RANK",
                                         help="ZeroQuant-V2's name (LoRC) for the same thing: --lorc-rank R is "
                                         "--lowrank-compensate R (fitted activation-weighted, as EoRA)."),
    smoothquant: str | None = typer.Option(None, "--smoothquant", metavar="ALPHA",
                                           help="SmoothQuant first: migrate activation outliers into the weights "
                                           "with strength ALPHA in [0, 1] (0.5 typical) or auto (searched per "
                                           "group); exact before quantization; needs --scheme w8a8-int8."),
    kv_cache: str | None = typer.Option(None, "--kv-cache", help=shown(
        "Quantize the KV cache too: fp8 (e4m3, one calibrated scale per layer for keys and one for values) or "
        "fp8-head (per KV head); written as compressed-tensors kv_cache_scheme.", "none")),
    rotate: str | None = typer.Option(None, "--rotate", help=shown("Rotate the model first (QuaRot-style, offline, "
                                                                   "exact before quantization): hadamard.", "none")),
    export_format: str | None = typer.Option(None, "--format", help=shown("Checkpoint layout: compressed-tensors "
                                                                          "or gptq.", "compressed-tensors")),
    recipe: str | None = typer.Option(None, "--recipe", help=shown("Base recipe (file or built-in name); options "
                                                                   "given override it.", "w4a16-gptq")),
    dataset: str | None = DATASET, num_samples: int | None = NUM_SAMPLES, seq_len: int | None = SEQ_LEN,
    doc_separator: str | None = DOC_SEPARATOR, output: Path | None = OUTPUT, overwrite: bool = OVERWRITE,
    resume: bool = RESUME, device: str | None = DEVICE, dtype: str | None = DTYPE, seed: int | None = SEED,
    eval_dataset: str | None = EVAL_DATASET, eval_windows: int | None = EVAL_WINDOWS,
    eval_seq_len: int | None = EVAL_SEQ_LEN, do_eval: bool | None = DO_EVAL,
    max_ppl_increase: float | None = MAX_PPL_INCREASE, min_compression_ratio: float | None = MIN_COMPRESSION_RATIO,
    trust_remote_code: bool = TRUST_REMOTE_CODE, allow_pickle: bool = ALLOW_PICKLE, dry_run: bool = DRY_RUN,
    as_json: bool = AS_JSON,
) -> None:
    """Quantize MODEL's linear layers and write a compressed-tensors (or GPTQ-layout) checkpoint."""
    activations = _scheme_activations(scheme, static, bits, group_size, sym, export_format)
    if threshold is not None and activations != "llm-int8":
        from compress.core.errors import CompressError

        raise CompressError("--threshold sets LLM.int8()'s outlier magnitude; add --scheme llm-int8")
    if activations is not None:
        bits, group_size = NAMED_SCHEMES[scheme].weights(group_size)  # type: ignore[index]
    rank = compensation_rank(lowrank_compensate, lorc_rank)
    flags = {
        "stages.*.method": method, "stages.*.bits": bits, "stages.*.group_size": group_size,
        "stages.*.symmetric": sym, "stages.*.ignore": ignore or None, "stages.*.act_order": act_order,
        "stages.*.damp": damp, "stages.*.block_size": block_size, "stages.*.static_groups": static_groups,
        "stages.*.observer": observer, "stages.*.indivisible": indivisible, "export.format": export_format,
        "stages.*.activations": activations, "stages.*.threshold": threshold,
        **job_flags(
            model=model, dataset=dataset, num_samples=num_samples, seq_len=seq_len, seed=seed, output=output,
            device=device, dtype=dtype, eval_dataset=eval_dataset, eval_windows=eval_windows, do_eval=do_eval,
            max_ppl_increase=max_ppl_increase, min_compression_ratio=min_compression_ratio,
            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, doc_separator=doc_separator,
            eval_seq_len=eval_seq_len,
        ),
    }
    base = recipe or (scheme if activations is not None else _preset_for(method))
    overrides = rotation_overrides(base, rotate, method)
    overrides = smoothquant_overrides(base, flags, smoothquant, overrides, method)
    overrides = kv_cache_overrides(base, kv_cache, overrides, method, export_format)
    flags, overrides = lowrank_arguments(base, flags, rank, overrides)
    execute_recipe(base, flags, overrides=overrides, overwrite=overwrite, dry_run=dry_run, as_json=as_json,
                   resume=resume)


def _preset_for(method: str | None) -> str:
    """The built-in recipe a bare ``--method`` starts from: the method's own W4A16 preset when there is one
    (so ``--method rtn`` gets RTN's defaults, min/max scales, not GPTQ's MSE search), else the default."""
    from compress.recipes.loader import preset_names

    name = f"w4a16-{method}"
    return name if method and name in preset_names() else "w4a16-gptq"


@dataclass(frozen=True)
class NamedScheme:
    """What ``--scheme NAME`` (also a built-in recipe) fixes in the quantize stage: ``activations``, and symmetric
    weights of ``bits`` in groups of ``group_size``, which ``--group-size`` may change only when ``grouped``."""

    activations: str
    bits: int = 8
    group_size: int = -1
    grouped: bool = False

    def weights(self, group_size: int | None) -> tuple[int, int]:
        """The stage's ``(bits, group_size)``: the scheme's, with a given ``--group-size`` where it is free."""
        return self.bits, group_size if self.grouped and group_size is not None else self.group_size

    def conflict(self, bits: int | None, group_size: int | None, sym: bool | None) -> bool:
        """Whether ``--bits`` / ``--group-size`` / ``--asym`` ask for weights this scheme does not have."""
        fixed_group = not self.grouped and group_size not in (None, self.group_size)
        return bits not in (None, self.bits) or fixed_group or sym is False

    def refusal(self, name: str) -> str:
        if self.grouped:
            return (f"--scheme {name} has {self.bits}-bit symmetric weights (in groups of --group-size, "
                    f"{self.group_size} by default); drop --bits and --asym or set them to {self.bits} and --sym")
        return (f"--scheme {name} has {self.bits}-bit symmetric per-channel weights; drop --bits, --group-size and "
                f"--asym or set them to {self.bits}, {self.group_size} and --sym")


NAMED_SCHEMES = {"w8a8-int8": NamedScheme("int8-dynamic"), "w4a8": NamedScheme("int8-dynamic", 4, 128, grouped=True),
                 "fp8": NamedScheme("none"), "w8a8-fp8": NamedScheme("fp8-dynamic"),
                 "llm-int8": NamedScheme("llm-int8")}
"""``--scheme`` names: int8 / e4m3 per-channel weights for w8a8-int8 and the FP8 two, int4 grouped for w4a8."""


def _scheme_activations(scheme: str | None, static: bool | None, bits: int | None, group_size: int | None,
                        sym: bool | None, export_format: str | None) -> str | None:
    """The stage's ``activations`` for ``--scheme``, or a one-sentence refusal (exit 2) before anything loads."""
    from compress.core.errors import CompressError

    if scheme is None:
        if static is not None:
            raise CompressError("--static/--dynamic choose how W8A8-FP8 scales its inputs; add --scheme w8a8-fp8")
        return None
    if scheme not in NAMED_SCHEMES:
        raise CompressError(f"unknown --scheme {scheme!r}; use {', '.join(NAMED_SCHEMES)}")
    named = NAMED_SCHEMES[scheme]
    if static is not None and scheme != "w8a8-fp8":
        raise CompressError(f"--static/--dynamic apply to --scheme w8a8-fp8 only; {scheme} "
                            + ("quantizes its inputs per token at run time" if named.activations == "int8-dynamic"
                               else "leaves its inputs unquantized"))
    if export_format == "gptq":
        raise CompressError(f"--scheme {scheme} is not an integer weight-only scheme, which is all the GPTQ layout "
                            "can express; use --format compressed-tensors")
    if named.conflict(bits, group_size, sym):
        raise CompressError(named.refusal(scheme))
    return "fp8-static" if scheme == "w8a8-fp8" and static else named.activations

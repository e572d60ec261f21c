"""``compress quantize``: sugar for a one-stage quantization Recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from compress.cli.common import execute_recipe, job_flags
from compress.cli.errors import handle_errors


@handle_errors
def quantize(
    model: str | None = typer.Argument(None, help="Local folder or hub id; omitted: the embedded demo model."),
    method: str | None = typer.Option(None, help="Quantization method: rtn or gptq (default gptq)."),
    bits: int | None = typer.Option(None, help="Weight bits: 2, 3, 4 or 8 (default 4)."),
    group_size: int | None = typer.Option(None, help="Input columns per scale: 32, 64, 128, ... or -1 per channel."),
    indivisible: str | None = typer.Option(None, help="Layers the group size does not divide: error (default) "
                                             "or per-channel."),
    sym: bool | None = typer.Option(None, "--sym/--asym", help="Symmetric (default) or asymmetric with zero points."),
    act_order: bool | None = typer.Option(None, "--act-order/--no-act-order",
                                          help="GPTQ: quantize columns by descending Hessian diagonal."),
    damp: float | None = typer.Option(None, help="GPTQ: dampening, a fraction of the mean Hessian diagonal."),
    block_size: int | None = typer.Option(None, help="GPTQ: columns per lazy-update block (default 128)."),
    static_groups: bool | None = typer.Option(None, "--static-groups/--no-static-groups",
                                              help="GPTQ: compute all group scales before the column sweep."),
    observer: str | None = typer.Option(None, help="Scale search: minmax or mse (clipping search)."),
    dataset: str | None = typer.Option(None, help="Calibration data: built-in name, local file/folder or hub id."),
    num_samples: int | None = typer.Option(None, help="Calibration samples (default 128)."),
    seq_len: int | None = typer.Option(None, help="Tokens per calibration sample (default: context, max 2048)."),
    ignore: list[str] | None = typer.Option(None, help="Layer name pattern to leave dense (repeatable)."),
    export_format: str | None = typer.Option(None, "--format", help="Checkpoint layout: compressed-tensors "
                                             "(default) or gptq."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output folder."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output folder."),
    resume: bool = typer.Option(False, help="Save each finished block; re-run the same command with --resume "
                                "after an interrupt to continue from the last saved block."),
    device: str | None = typer.Option(None, help="auto, cpu or cuda."),
    dtype: str | None = typer.Option(None, help="auto, float32, float16 or bfloat16."),
    seed: int | None = typer.Option(None, help="Seed for calibration sampling."),
    recipe: str | None = typer.Option(None, "--recipe", help="Base recipe (file or built-in name); flags override it."),
    eval_dataset: str | None = typer.Option(None, help="Held-out text for the eval of the export."),
    eval_windows: int | None = typer.Option(None, help="Evaluate at most this many windows."),
    do_eval: bool | None = typer.Option(None, "--eval/--no-eval", help="Evaluate the export (default on)."),
    max_ppl_increase: float | None = typer.Option(None, help="Gate: fail (exit 3) above this relative increase."),
    min_compression_ratio: float | None = typer.Option(None, help="Gate: fail (exit 3) below this size ratio."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own Python code to run."),
    allow_pickle: bool = typer.Option(False, help="Allow .bin/.pt pickled weights (loaded weights_only)."),
    dry_run: bool = typer.Option(False, help="Print the resolved recipe and layers; load no weights."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Quantize MODEL's linear layers and write a compressed-tensors (or GPTQ-layout) checkpoint."""
    flags = {
        "stages.*.method": method, "stages.*.bits": bits, "stages.*.group_size": group_size,
        "stages.*.symmetric": sym, "stages.*.ignore": ignore or None, "stages.*.act_order": act_order,
        "stages.*.damp": damp, "stages.*.block_size": block_size, "stages.*.static_groups": static_groups,
        "stages.*.observer": observer, "stages.*.indivisible": indivisible, "export.format": export_format,
        **job_flags(
        model=model, dataset=dataset, num_samples=num_samples, seq_len=seq_len, seed=seed, output=output,
        device=device, dtype=dtype, eval_dataset=eval_dataset, eval_windows=eval_windows, do_eval=do_eval,
        max_ppl_increase=max_ppl_increase, min_compression_ratio=min_compression_ratio,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
    ),
    }
    execute_recipe(recipe or "w4a16-gptq", flags, overrides=[], overwrite=overwrite, dry_run=dry_run,
                   as_json=as_json, resume=resume)

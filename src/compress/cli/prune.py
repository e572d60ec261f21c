"""``compress prune``: sugar for a pruning Recipe (unstructured, N:M, or structured), optionally quantized."""

from __future__ import annotations

from pathlib import Path

import typer

from compress.cli.common import execute_recipe, job_flags
from compress.cli.errors import handle_errors
from compress.core.errors import CompressError


def _per_layer(path: Path | None) -> dict[str, float] | None:
    """``--per-layer-sparsity FILE.yaml``: a mapping of layer pattern → sparsity (read with safe_load)."""
    if path is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CompressError(f"cannot read --per-layer-sparsity file {path} ({error.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError):
        raise CompressError(f"--per-layer-sparsity file {path} is not valid YAML") from None
    if not isinstance(data, dict) or not data:
        raise CompressError(f"--per-layer-sparsity file {path} must map layer patterns to sparsities, "
                            "e.g. 'mlp.down_proj: 0.6'")
    bad = [k for k, v in data.items() if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int | float)]
    if bad:
        raise CompressError(f"--per-layer-sparsity file {path}: entry {bad[0]!r} must map a pattern to a number")
    return {k: float(v) for k, v in data.items()}


@handle_errors
def prune(
    model: str | None = typer.Argument(None, help="Local folder or hub id; omitted: the embedded demo model."),
    method: str | None = typer.Option(None, help="magnitude, wanda or sparsegpt (default sparsegpt)."),
    sparsity: float | None = typer.Option(None, help="Fraction of each row's weights removed (default 0.5)."),
    pattern: str | None = typer.Option(None, help="N:M semi-structured sparsity, e.g. 2:4 (keep 2 of every 4)."),
    per_layer_sparsity: Path | None = typer.Option(None, help="YAML file: layer pattern -> sparsity."),
    structured: str | None = typer.Option(None, help="Remove whole units instead: channels, heads or blocks."),
    ratio: float | None = typer.Option(None, help="Structured: fraction of channels / heads / blocks removed."),
    bits: int | None = typer.Option(None, help="SparseGPT: also quantize the kept weights to 2, 3, 4 or 8 bits."),
    group_size: int | None = typer.Option(None, help="With --bits: input columns per scale, or -1 per channel."),
    sym: bool | None = typer.Option(None, "--sym/--asym", help="With --bits: symmetric (default) or asymmetric."),
    damp: float | None = typer.Option(None, help="SparseGPT: dampening, a fraction of the mean Hessian diagonal."),
    dataset: str | None = typer.Option(None, help="Calibration data: built-in name, local file/folder or hub id."),
    num_samples: int | None = typer.Option(None, help="Calibration samples (default 128)."),
    seq_len: int | None = typer.Option(None, help="Tokens per calibration sample (default: context, max 2048)."),
    ignore: list[str] | None = typer.Option(None, help="Layer name pattern to leave dense (repeatable)."),
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
    """Prune MODEL's linear layers (sparse-bitmask checkpoint) or remove whole units (a smaller plain model)."""
    if structured is not None and (method is not None or pattern is not None or sparsity is not None or bits is not None):
        raise CompressError("--structured removes whole units; it does not combine with --method, --sparsity, "
                            "--pattern or --bits")
    if ratio is not None and structured is None:
        raise CompressError("--ratio applies to --structured pruning; use --sparsity for unstructured pruning")
    if structured is not None and ratio is None:
        raise CompressError("--structured needs --ratio, the fraction of channels, heads or blocks to remove")
    flags = {
        "stages.*.method": "structured" if structured is not None else method,
        "stages.*.sparsity": sparsity, "stages.*.pattern": pattern, "stages.*.per_layer": _per_layer(per_layer_sparsity),
        "stages.*.target": structured, "stages.*.ratio": ratio, "stages.*.bits": bits,
        "stages.*.group_size": group_size, "stages.*.symmetric": sym, "stages.*.damp": damp,
        "stages.*.ignore": ignore or None,
        **job_flags(
        model=model, dataset=dataset, num_samples=num_samples, seq_len=seq_len, seed=seed, output=output,
        device=device, dtype=dtype, eval_dataset=eval_dataset, eval_windows=eval_windows, do_eval=do_eval,
        max_ppl_increase=max_ppl_increase, min_compression_ratio=min_compression_ratio,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
    ),
    }
    execute_recipe(recipe or "sparse50-sparsegpt", flags, overrides=[], overwrite=overwrite, dry_run=dry_run,
                   as_json=as_json, resume=resume)

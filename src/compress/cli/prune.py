"""``compress prune``: sugar for a pruning Recipe (unstructured, N:M, or structured), optionally quantized."""

from __future__ import annotations

from pathlib import Path

import typer

from compress.cli._params import shown
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
    method: str | None = typer.Option(None, help=shown("magnitude, wanda or sparsegpt.", "sparsegpt")),
    sparsity: float | None = typer.Option(None, help=shown("Fraction of each row's weights removed.", "0.5")),
    pattern: str | None = typer.Option(None, help="N:M semi-structured sparsity, e.g. 2:4 (keep 2 of every 4)."),
    per_layer_sparsity: Path | None = typer.Option(None, help="YAML file: layer pattern -> sparsity."),
    structured: str | None = typer.Option(None, help="Remove whole units instead: channels, heads or blocks."),
    ratio: float | None = typer.Option(None, help="Structured: fraction of channels / heads / blocks removed (heads: "
                                       "the nearest cut the model's config accepts, reported)."),
    bits: int | None = typer.Option(None, help="SparseGPT: also quantize the kept weights to 2, 3, 4 or 8 bits."),
    group_size: int | None = typer.Option(None, help=shown("With --bits: input columns per scale, or -1 per "
                                                           "channel.", "128")),
    sym: bool | None = typer.Option(None, "--sym/--asym", help=shown("With --bits: symmetric or asymmetric.",
                                                                     "--sym")),
    damp: float | None = typer.Option(None, help=shown("SparseGPT: dampening, a fraction of the mean Hessian "
                                                       "diagonal.", "0.01")),
    ignore: list[str] | None = typer.Option(None, help=shown("Layer name pattern to leave dense (repeatable).",
                                                             "lm_head")),
    sparse_format: str | None = typer.Option(None, help=shown(
        "How pruned dense layers are stored: dense (every reader loads it) or bitmask (compressed-tensors "
        "sparse-bitmask, smaller on disk, read only by compress.load; other readers refuse it).", "dense")),
    recipe: str | None = typer.Option(None, "--recipe", help=shown("Base recipe (file or built-in name); options "
                                                                   "given override it.", "sparse50-sparsegpt")),
    dataset: str | None = DATASET, num_samples: int | None = NUM_SAMPLES, seq_len: int | None = SEQ_LEN,
    doc_separator: str | None = DOC_SEPARATOR, output: Path | None = OUTPUT, overwrite: bool = OVERWRITE,
    resume: bool = RESUME, device: str | None = DEVICE, dtype: str | None = DTYPE, seed: int | None = SEED,
    eval_dataset: str | None = EVAL_DATASET, eval_windows: int | None = EVAL_WINDOWS,
    eval_seq_len: int | None = EVAL_SEQ_LEN, do_eval: bool | None = DO_EVAL,
    max_ppl_increase: float | None = MAX_PPL_INCREASE, min_compression_ratio: float | None = MIN_COMPRESSION_RATIO,
    trust_remote_code: bool = TRUST_REMOTE_CODE, allow_pickle: bool = ALLOW_PICKLE, dry_run: bool = DRY_RUN,
    as_json: bool = AS_JSON,
) -> None:
    """Prune MODEL's linear layers (zeros in a plain checkpoint, or --sparse-format bitmask) or remove whole
    units (a smaller plain model)."""
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
        "stages.*.ignore": ignore or None, "export.sparse_format": sparse_format,
        **job_flags(
            model=model, dataset=dataset, num_samples=num_samples, seq_len=seq_len, seed=seed, output=output,
            device=device, dtype=dtype, eval_dataset=eval_dataset, eval_windows=eval_windows, do_eval=do_eval,
            max_ppl_increase=max_ppl_increase, min_compression_ratio=min_compression_ratio,
            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, doc_separator=doc_separator,
            eval_seq_len=eval_seq_len,
        ),
    }
    execute_recipe(recipe or "sparse50-sparsegpt", flags, overrides=[], overwrite=overwrite, dry_run=dry_run,
                   as_json=as_json, resume=resume)

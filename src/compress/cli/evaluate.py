"""``compress eval``: perplexity (and KL / top-1 against a baseline), or embedding cosine for encoders."""

from __future__ import annotations

import typer

from compress.cli._output import info, key_value_table, metrics_rows, out, print_json, progress_bars
from compress.cli.errors import handle_errors
from compress.core.errors import GateFailed


@handle_errors
def evaluate(
    path: str = typer.Argument(..., help="A compressed checkpoint or any HF model folder / hub id."),
    baseline: str | None = typer.Option(None, help="The model to compare against (KL, top-1, cosine)."),
    dataset: str = typer.Option("demo-heldout", help="Held-out text: built-in name, local file/folder, hub id."),
    seq_len: int | None = typer.Option(None, help="Window length (default: context, max 2048)."),
    max_windows: int | None = typer.Option(None, help="Evaluate at most this many windows."),
    max_ppl_increase: float | None = typer.Option(None, help="Gate: exit 3 above this relative increase (0.05=5%)."),
    min_compression_ratio: float | None = typer.Option(None, help="Gate: exit 3 below this baseline/size ratio."),
    min_cosine: float | None = typer.Option(None, help="Gate for encoders: exit 3 below this mean cosine."),
    kernel: str = typer.Option("reference", help="Forward path of quantized layers: reference (exact, the "
                               "default), auto, cpu or triton."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own Python code to run."),
    allow_pickle: bool = typer.Option(False, help="Allow .bin/.pt pickled weights (loaded weights_only)."),
    dry_run: bool = typer.Option(False, help="Print what would be evaluated; load no weights."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Evaluate PATH on held-out text, optionally side by side with --baseline."""
    from compress.recipes.schema import EvalConfig

    try:
        config = EvalConfig(dataset=dataset, seq_len=seq_len, max_windows=max_windows,
                            max_ppl_increase=max_ppl_increase, min_compression_ratio=min_compression_ratio,
                            min_cosine=min_cosine, kernel=kernel)
    except Exception as error:  # pydantic ValidationError: turn into one sentence
        from compress.core.errors import CompressError
        from compress.recipes.loader import validation_message

        raise CompressError(validation_message(error, "option")) from None
    if dry_run:
        payload = {"dry_run": True, "path": path, "baseline": baseline, "eval": config.model_dump()}
        print_json(payload) if as_json else out.print(payload)
        return
    from compress.evaluate.gates import check_gates
    from compress.pipeline.evaluation import evaluate as run_eval

    with progress_bars(enabled=not as_json) as progress:
        metrics = run_eval(path, baseline=baseline, config=config, trust_remote_code=trust_remote_code,
                           allow_pickle=allow_pickle, progress=progress)
    gates = check_gates(metrics, max_ppl_increase=max_ppl_increase, min_compression_ratio=min_compression_ratio,
                        min_cosine=min_cosine)
    payload = {"path": path, "baseline": baseline, **metrics,
               "gates": [g.__dict__ for g in gates]}
    failed = [g.message for g in gates if not g.passed]
    if failed:
        raise GateFailed("; ".join(failed), report=payload)
    if as_json:
        print_json(payload)
        return
    rows = [("model", path), *([("baseline", baseline)] if baseline else []), *metrics_rows(metrics)]
    if "compression_ratio" in metrics:
        rows.append(("compression ratio", f"{metrics['compression_ratio']:.2f}x"))
    out.print(key_value_table("compress eval", rows))
    for gate in gates:
        info(f"gate {gate.name}: passed ({gate.message})")

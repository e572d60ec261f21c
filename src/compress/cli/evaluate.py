"""``compress eval``: perplexity (and KL / top-1 against a baseline), or embedding cosine for encoders."""

from __future__ import annotations

import typer

from compress.cli._output import print_json, print_yaml, progress_bars
from compress.cli._params import flag, shown
from compress.cli.common import print_eval, unescape
from compress.cli.errors import handle_errors
from compress.core.errors import GateFailed


@handle_errors
def evaluate(
    path: str = typer.Argument(..., help="A compressed checkpoint or any HF model folder / hub id."),
    baseline: str | None = typer.Option(None, help="The model to compare against (KL, top-1, cosine)."),
    dataset: str = typer.Option("demo-heldout", help="Held-out text: built-in name, local file/folder, hub id."),
    seq_len: int | None = typer.Option(None, help=shown("Tokens per window.", "the model's context, at most 2048")),
    max_windows: int | None = typer.Option(None, help=shown("Evaluate at most this many windows.", "all")),
    doc_separator: str | None = typer.Option(None, help=shown("Text that separates documents in a .txt file; the "
                                                              "escapes \\n, \\t and \\\\ are understood, e.g. "
                                                              "--doc-separator '\\n\\n'.",
                                                              "none: a text file is one stream")),
    max_ppl_increase: float | None = typer.Option(None, help="Gate: exit 3 above this relative increase (0.05=5%)."),
    min_compression_ratio: float | None = typer.Option(None, help="Gate: exit 3 below this baseline/size ratio."),
    min_cosine: float | None = typer.Option(None, help="Gate for encoders: exit 3 below this mean cosine."),
    kernel: str = typer.Option("reference", help="Forward path of quantized layers: reference (exact), auto, cpu "
                               "or triton."),
    trust_remote_code: bool = flag("--trust-remote-code", "Allow the model's own Python code to run."),
    allow_pickle: bool = flag("--allow-pickle", "Allow .bin/.pt pickled weights (loaded weights_only)."),
    dry_run: bool = flag("--dry-run", "Print what would be evaluated; load no weights."),
    as_json: bool = flag("--json", "Print one JSON object on stdout."),
) -> None:
    """Evaluate PATH on held-out text, optionally side by side with --baseline."""
    from compress.recipes.schema import EvalConfig

    separator = unescape(doc_separator)
    try:
        config = EvalConfig(dataset=dataset, seq_len=seq_len, max_windows=max_windows,
                            max_ppl_increase=max_ppl_increase, min_compression_ratio=min_compression_ratio,
                            min_cosine=min_cosine, kernel=kernel,
                            **({"doc_separator": separator} if separator is not None else {}))
    except Exception as error:  # pydantic ValidationError: turn into one sentence
        from compress.core.errors import CompressError
        from compress.recipes.loader import validation_message

        raise CompressError(validation_message(error, "option")) from None
    if dry_run:
        payload = {"dry_run": True, "path": path, "baseline": baseline, "eval": config.model_dump(mode="json")}
        if as_json:
            print_json(payload)
        else:
            print_yaml(payload)
        return
    from compress.evaluate.gates import check_gates
    from compress.pipeline.evaluation import evaluate as run_eval

    with progress_bars() as progress:  # on stderr, so --json keeps stdout to one object
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
    print_eval(payload)

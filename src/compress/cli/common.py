"""Shared by the commands that run a Recipe: build it, dry-run or run it, render the result."""

from __future__ import annotations

import re
import time
from typing import Any

import typer

from compress.cli._output import (
    err,
    human_bytes,
    info,
    key_value_table,
    log,
    metrics_rows,
    out,
    print_json,
    progress_bars,
    write_raw,
)
from compress.cli._params import flag, shown

# The options every recipe-running command shares (quantize, prune), declared once. Those a recipe can set
# default to None, so that an option left out never overrides the recipe; their help says the default.
DATASET = typer.Option(None, help=shown("Calibration data: built-in name, local file/folder or hub id.",
                                        "demo-calib"))
NUM_SAMPLES = typer.Option(None, help=shown("Calibration samples.", "128"))
SEQ_LEN = typer.Option(None, help=shown("Tokens per calibration sample.", "the model's context, at most 2048"))
DOC_SEPARATOR = typer.Option(None, help=shown("Text that separates documents in a .txt file, for calibration and "
                                              "eval; the escapes \\n, \\t and \\\\ are understood, e.g. "
                                              "--doc-separator '\\n\\n'.",
                                              "none: a text file is one stream"))
OUTPUT = typer.Option(None, "--output", "-o", help=shown("Output folder.", "./compressed/<model>-<scheme>"))
OVERWRITE = flag("--overwrite", "Replace a non-empty output folder.")
RESUME = flag("--resume", "Save each finished block; re-run the same command with --resume after an interrupt to "
              "continue from the last saved block.")
DEVICE = typer.Option(None, help=shown("auto, cpu or cuda.", "auto"))
DTYPE = typer.Option(None, help=shown("auto, float32, float16 or bfloat16.", "auto"))
SEED = typer.Option(None, help=shown("Seed for calibration sampling.", "0"))
EVAL_DATASET = typer.Option(None, help=shown("Held-out text for the eval of the export.", "demo-heldout"))
EVAL_WINDOWS = typer.Option(None, help=shown("Evaluate at most this many windows.", "all"))
EVAL_SEQ_LEN = typer.Option(None, help=shown("Tokens per eval window.", "the model's context, at most 2048"))
DO_EVAL = typer.Option(None, "--eval/--no-eval", help=shown("Evaluate the export.", "--eval"))
MAX_PPL_INCREASE = typer.Option(None, help="Gate: fail (exit 3) above this relative perplexity increase "
                                "(0.05 = 5%).")
MIN_COMPRESSION_RATIO = typer.Option(None, help="Gate: fail (exit 3) below this size ratio (before / after).")
TRUST_REMOTE_CODE = flag("--trust-remote-code", "Allow the model's own Python code to run.")
ALLOW_PICKLE = flag("--allow-pickle", "Allow .bin/.pt pickled weights (loaded weights_only).")
DRY_RUN = flag("--dry-run", "Print the resolved recipe and layers; load no weights.")
AS_JSON = flag("--json", "Print one JSON object on stdout (progress stays on stderr).")


def unescape(text: str | None) -> str | None:
    """``\\n``, ``\\t``, ``\\r`` and ``\\\\`` as typed on a shell (``--doc-separator '\\n\\n'``) → the characters."""
    if text is None:
        return None
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), "\\"), text)


def job_flags(*, model, dataset, num_samples, seq_len, seed, output, device, dtype, eval_dataset, eval_windows,
              do_eval, max_ppl_increase, min_compression_ratio, trust_remote_code, allow_pickle,
              doc_separator=None, eval_seq_len=None) -> dict[str, Any]:
    """The options every recipe-running command shares, as recipe field paths (``None``: not given)."""
    separator = unescape(doc_separator)
    return {
        "model": model, "calibration.dataset": dataset, "calibration.num_samples": num_samples,
        "calibration.seq_len": seq_len, "calibration.seed": seed, "calibration.doc_separator": separator,
        "output": str(output) if output else None, "device": device, "dtype": dtype, "eval.dataset": eval_dataset,
        "eval.max_windows": eval_windows, "eval.seq_len": eval_seq_len, "eval.doc_separator": separator,
        "eval.enabled": do_eval, "eval.max_ppl_increase": max_ppl_increase,
        "eval.min_compression_ratio": min_compression_ratio, "trust_remote_code": trust_remote_code or None,
        "allow_pickle": allow_pickle or None,
    }


def execute_recipe(source: str, flags: dict[str, Any], *, overrides: list[str], overwrite: bool, dry_run: bool,
                   as_json: bool, resume: bool = False) -> None:
    """Build the Recipe, then plan it (``dry_run``) or run it; ``resume`` checkpoints every block and
    continues an interrupted run of the same recipe (every command that runs a recipe gets it from here)."""
    from compress.recipes.flags import recipe_from_flags
    from compress.recipes.loader import apply_overrides, load_recipe_data

    base = apply_overrides(load_recipe_data(source), overrides)
    recipe = recipe_from_flags(base, flags)
    if dry_run:
        from compress.pipeline.run import dry_run as plan_only

        print_plan(plan_only(recipe), as_json)
        return
    from compress.pipeline.run import run

    start = time.perf_counter()
    sweep = "+".join(dict.fromkeys(stage.method for stage in recipe.stages if stage.method != "structured"))
    with progress_bars(what=sweep or None) as progress:  # on stderr, so --json keeps stdout to one object
        result = run(recipe, overwrite=overwrite, progress=progress, log=log, resume=resume)
    payload = result.to_dict()
    payload["timings"]["wall_s"] = time.perf_counter() - start
    if as_json:
        print_json(payload)
    else:
        print_result(payload)


def print_plan(plan: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json({"dry_run": True, **plan})
        return
    import yaml

    out.print("[bold]resolved recipe[/bold]")
    write_raw(yaml.safe_dump(plan["recipe"], sort_keys=False))
    out.print(f"model: {plan['model']}\noutput: {plan['output']}", markup=False)
    structured = iter(plan.get("structured", []))
    for stage in plan["stages"]:
        if stage["method"] == "structured":  # whole units, not layers: say what goes
            entry = next(structured, None)
            out.print(f"[bold]structured {stage['scheme']}[/bold]: {entry['summary'] if entry else ''}", soft_wrap=True)
            continue
        out.print(f"[bold]{stage['method']} {stage['scheme']}[/bold]: {len(stage['layers'])} layers")
        for layer in stage["layers"]:
            scheme = layer.get("scheme", stage["scheme"])
            note = f"  ({scheme})" if scheme != stage["scheme"] else ""
            out.print(f"  {layer['name']}  [{layer['out_features']} x {layer['in_features']}]{note}", markup=False,
                      soft_wrap=True)
        fell = [layer for layer in stage["layers"] if layer.get("scheme", stage["scheme"]) != stage["scheme"]]
        if fell:
            widths = ", ".join(map(str, sorted({layer["in_features"] for layer in fell})))
            log(f"{len(fell)} of {len(stage['layers'])} layers would be quantized per channel instead of "
                f"{stage['scheme']}: the group size does not divide their input width ({widths})")


def print_result(payload: dict[str, Any], *, verdict_follows: bool = False) -> None:
    """The summary table on stdout, then one line per gate and per note on stderr. ``verdict_follows``: a
    gate failed and the caller prints the verdict, so only the passed gates are listed here."""
    timings = payload.get("timings", {})
    after = payload.get("parameters_after")
    if after is not None and after != payload["parameters"]:
        change = (after - payload["parameters"]) / payload["parameters"] * 100 if payload["parameters"] else 0.0
        parameters = f"{payload['parameters']:,} → {after:,} ({change:+.1f}%)"
    else:
        parameters = f"{payload['parameters']:,}"
    rows = [("model", payload["model"]), ("parameters", parameters)]
    rows += [("removed", stage["summary"]) for stage in payload.get("structured", [])]
    if payload["layers"] or not payload.get("structured"):
        rows.append(("layers compressed", str(payload["layers"])))
    wall = timings.get("wall_s", timings.get("total_s"))
    rows += [
        ("size on disk before", human_bytes(payload["size_before_bytes"] or None)),
        ("size on disk after", human_bytes(payload["size_after_bytes"])),
        ("compression ratio", f"{payload['compression_ratio']:.2f}x" if payload["compression_ratio"] else "-"),
        *metrics_rows(payload["metrics"]),
        ("wall time", "-" if wall is None else f"{wall:.1f} s (compress {timings.get('compress_s', 0):.1f} s, "
                                               f"eval {timings.get('eval_s', 0):.1f} s)"),
        ("output", payload["output"]),
    ]
    title = "compress: done" if not verdict_follows else "compress: done, but a gate failed"
    out.print(key_value_table(title, rows))
    for note in payload.get("notes", []):
        log(note)
    for gate in payload.get("gates", []):
        if gate["passed"] or not verdict_follows:
            info(f"gate {gate['name']}: {'passed' if gate['passed'] else 'FAILED'} ({gate['message']})")
    err.file.flush()


def print_eval(payload: dict[str, Any], *, verdict_follows: bool = False) -> None:
    """``compress eval``'s table (stdout) and passed gates (stderr); the payload is its --json object."""
    rows = [("model", payload["path"]), *([("baseline", payload["baseline"])] if payload.get("baseline") else []),
            *metrics_rows(payload)]
    if "compression_ratio" in payload:
        rows.append(("compression ratio", f"{payload['compression_ratio']:.2f}x"))
    out.print(key_value_table("compress eval", rows))
    for gate in payload.get("gates", []):
        if gate["passed"] or not verdict_follows:
            info(f"gate {gate['name']}: {'passed' if gate['passed'] else 'FAILED'} ({gate['message']})")
    err.file.flush()


def print_report(report: dict[str, Any]) -> None:
    """The table a failed gate's report would have had (a run's result or an eval), before the verdict."""
    if "timings" in report and "output" in report:
        print_result(report, verdict_follows=True)
    elif "path" in report:
        print_eval(report, verdict_follows=True)

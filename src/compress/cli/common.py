"""Shared by the commands that run a Recipe: build it, dry-run or run it, render the result."""

from __future__ import annotations

import time
from typing import Any

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
)


def job_flags(*, model, dataset, num_samples, seq_len, seed, output, device, dtype, eval_dataset, eval_windows,
              do_eval, max_ppl_increase, min_compression_ratio, trust_remote_code, allow_pickle) -> dict[str, Any]:
    """The options every recipe-running command shares, as recipe field paths (``None``: not given)."""
    return {
        "model": model, "calibration.dataset": dataset, "calibration.num_samples": num_samples,
        "calibration.seq_len": seq_len, "calibration.seed": seed, "output": str(output) if output else None,
        "device": device, "dtype": dtype, "eval.dataset": eval_dataset, "eval.max_windows": eval_windows,
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
    with progress_bars(enabled=not as_json) as progress:
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
    out.print(yaml.safe_dump(plan["recipe"], sort_keys=False), markup=False, highlight=False)
    out.print(f"model: {plan['model']}\noutput: {plan['output']}", markup=False)
    for stage in plan["stages"]:
        out.print(f"[bold]{stage['method']} {stage['scheme']}[/bold]: {len(stage['layers'])} layers")
        for layer in stage["layers"]:
            out.print(f"  {layer['name']}  [{layer['out_features']} x {layer['in_features']}]", markup=False)


def print_result(payload: dict[str, Any]) -> None:
    timings = payload["timings"]
    rows = [
        ("model", payload["model"]),
        ("parameters", f"{payload['parameters']:,}"),
        ("layers compressed", str(payload["layers"])),
        ("size on disk before", human_bytes(payload["size_before_bytes"] or None)),
        ("size on disk after", human_bytes(payload["size_after_bytes"])),
        ("compression ratio", f"{payload['compression_ratio']:.2f}x" if payload["compression_ratio"] else "-"),
        *metrics_rows(payload["metrics"]),
        ("wall time", f"{timings['wall_s']:.1f} s (compress {timings['compress_s']:.1f} s, "
                      f"eval {timings['eval_s']:.1f} s)"),
        ("output", payload["output"]),
    ]
    out.print(key_value_table("compress: done", rows))
    for gate in payload.get("gates", []):
        info(f"gate {gate['name']}: {'passed' if gate['passed'] else 'FAILED'} ({gate['message']})")
    err.file.flush()

"""Shared by benchmark scripts: machine facts, writing results/<name>.json|md, and running one recipe in a
child process (``spawn_recipe``) so that its peak RSS and wall time are its own."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def median_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def write_results(name: str, payload: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)


def run_recipe_job(spec: str) -> None:
    """Child mode: run one ``{"recipe": ..., "out": ...}`` job through ``compress.run`` (the CLI's path) and
    print its metrics, timings, sizes, wall time and this process's peak RSS as one JSON line."""
    import compress
    from compress.recipes.loader import recipe_from_dict

    job = json.loads(spec)
    start = time.perf_counter()
    result = compress.run(recipe_from_dict(job["recipe"]), job["out"])
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"metrics": result.metrics, "timings": result.timings, "wall_s": wall,
                      "peak_rss_mb": peak_kb / 1024, "size_after_bytes": result.size_after_bytes,
                      "size_before_bytes": result.size_before_bytes}))


def spawn_recipe(recipe: dict[str, Any], out: Path) -> dict[str, Any]:
    """``run_recipe_job`` in a fresh interpreter; its JSON line, or RuntimeError with the child's stderr."""
    job = json.dumps({"recipe": recipe, "out": str(out)})
    done = subprocess.run([sys.executable, __file__, "--one", job], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--one":
    run_recipe_job(sys.argv[2])

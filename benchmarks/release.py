"""Release checks, measured: bad inputs and the message each gets, determinism, resume after a kill, fuzzing.

Every bad input runs the real console script in a subprocess (exit code and stderr exactly as a CI job
sees them). The determinism and resume checks run `compress quantize` on the embedded demo model (GPTQ,
4 blocks). The resume check kills the process with SIGKILL (as a power cut would, no cleanup code runs)
once two blocks are saved, then re-runs the same command with --resume.

Run: python benchmarks/release.py  → benchmarks/results/release.json and release.md
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from _common import write_results  # noqa: E402

# one thread per run: on a shared machine, spinning OpenMP workers make wall time meaningless; CPU time
# (user + sys of the child) is what the resume comparison uses
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}
CLI = [sys.executable, "-m", "compress.cli.main"]
GPTQ_ARGS = ["--num-samples", "32", "--eval-windows", "20", "--device", "cpu", "--json"]
RESUME_BLOCKS = 8
RESUME_ARGS = ["--num-samples", "64", "--seq-len", "128", "--eval-windows", "4", "--device", "cpu", "--json"]


def cli(args: list[str], timeout: int = 300) -> tuple[int, str, float]:
    start = time.perf_counter()
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, env=ENV, timeout=timeout)
    return done.returncode, done.stderr.strip(), time.perf_counter() - start


def folder_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- fixtures for the bad inputs


def build_fixtures(tmp: Path) -> dict[str, Path]:
    import _tiny
    from safetensors.torch import load_file

    import compress
    from compress.recipes.loader import recipe_from_dict

    f: dict[str, Path] = {"tmp": tmp}
    f["model"] = _tiny.save_tiny("llama", tmp / "tiny-llama")
    f["corpus"] = tmp / "corpus.txt"
    f["corpus"].write_text("\n\n".join(f"{_tiny.SENTENCES[i % 10]} {i}" for i in range(200)))
    f["packed"] = tmp / "packed"
    compress.run(recipe_from_dict({"model": str(f["model"]), "eval": {"enabled": False},
                                   "calibration": {"dataset": str(f["corpus"]), "num_samples": 2, "seq_len": 16},
                                   "stages": [{"method": "rtn", "bits": 4, "group_size": 32}]}), f["packed"])

    def copy(src: Path, name: str) -> Path:
        dst = tmp / name
        shutil.copytree(src, dst)
        return dst

    def write(name: str, text: str | bytes) -> Path:
        path = tmp / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    write("empty.txt", "")
    write("short.txt", "the dog")
    write("bad.jsonl", '{"text": "fine"}\n{not json\n')
    write("notext.csv", "id,label\n1,a\n2,b\n")
    write("recipe-bad-yaml.yaml", "stages: [\n  - method: rtn\n bits: 4\n")
    write("recipe-unknown-key.yaml", "stages:\n  - method: rtn\n    bitz: 4\n")
    write("recipe-no-stages.yaml", "stages: []\n")
    write("recipe-python.yaml", "stages: !!python/object/apply:os.system ['echo pwned']\n")
    write("recipe-nested.yaml", "[" * 5000)
    write("recipe-bits-word.yaml", "stages:\n  - method: rtn\n    bits: four\n")
    write("recipe-list.yaml", "- method: rtn\n")
    f["pickle"] = _tiny.write_pickle_only("llama", tmp / "pickle-only")
    nocfg = tmp / "no-config"
    nocfg.mkdir()
    noweights = tmp / "no-weights"
    noweights.mkdir()
    shutil.copy(f["model"] / "config.json", noweights / "config.json")
    for name, shard in (("index-escape", "../../etc/passwd"), ("index-absolute", "/etc/passwd")):
        folder = copy(f["model"], name)
        keys = list(load_file(folder / "model.safetensors"))
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        weight_map = {k: "model-00001-of-00001.safetensors" for k in keys}
        weight_map[keys[0]] = shard
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    folder = copy(f["model"], "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    folder = copy(f["model"], "header-lies")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[:8] = (10**9).to_bytes(8, "little")
    (folder / "model.safetensors").write_bytes(bytes(data))
    folder = copy(f["model"], "config-not-json")
    (folder / "config.json").write_text("{not json")
    folder = copy(f["packed"], "packed-bits-5")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    folder = copy(f["packed"], "packed-no-qconfig")
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config")
    (folder / "config.json").write_text(json.dumps(config))
    folder = copy(f["packed"], "packed-no-manifest")
    (folder / "manifest.json").unlink()
    folder = copy(f["packed"], "packed-tampered")
    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text() + " ")
    (folder / "extra.py").write_text("print('hi')\n")
    taken = tmp / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    stale = tmp / ".stale-out.partial"
    stale.mkdir()
    (stale / "progress.json").write_text(json.dumps({"version": 1, "recipe_sha256": "0" * 64}))
    return f


def bad_inputs(f: dict[str, Path]) -> list[dict]:
    t, m, c = f["tmp"], str(f["model"]), str(f["corpus"])
    base = ["quantize", m, "--method", "rtn", "--group-size", "32", "--num-samples", "2", "--seq-len", "16",
            "--no-eval"]
    q = [*base, "--dataset", c]
    out = ["--output", str(t / "out")]
    cases = [
        ("cli", "--bits 5", [*q, "--bits", "5", *out]),
        ("cli", "--group-size 48 (does not divide 64)", [*q, "--group-size", "48", *out]),
        ("cli", "--method nope", [*q, "--method", "nope", *out]),
        ("cli", "--act-order with --method rtn", [*q, "--act-order", *out]),
        ("cli", "--device cuda without a GPU", [*q, "--device", "cuda", *out]),
        ("cli", "--dtype int7", [*q, "--dtype", "int7", *out]),
        ("cli", "--num-samples 0", [*q, "--num-samples", "0", *out]),
        ("cli", "non-empty --output without --overwrite", [*q, "--output", str(t / "taken")]),
        ("cli", "--resume onto another recipe's interrupted run", [*q, "--resume", "--output", str(t / "stale-out")]),
        ("cli", "convert --to onnx", ["convert", str(f["packed"]), "--to", "onnx", "--output", str(t / "conv")]),
        ("cli", "eval of a folder that does not exist", ["eval", str(t / "absent")]),
        ("cli", "verify a folder without manifest.json", ["verify", str(t / "packed-no-manifest")]),
        ("cli", "verify a tampered release (not bad input: exit 1)", ["verify", str(t / "packed-tampered")]),
        ("recipe", "recipe file does not exist", ["run", str(t / "absent.yaml"), *out]),
        ("recipe", "recipe is not valid YAML", ["run", str(t / "recipe-bad-yaml.yaml"), *out]),
        ("recipe", "recipe has an unknown key", ["run", str(t / "recipe-unknown-key.yaml"), *out]),
        ("recipe", "recipe has no stages", ["run", str(t / "recipe-no-stages.yaml"), *out]),
        ("recipe", "recipe names a Python object (!!python/object)", ["run", str(t / "recipe-python.yaml"), *out]),
        ("recipe", "recipe nested 5000 levels deep", ["run", str(t / "recipe-nested.yaml"), *out]),
        ("recipe", "recipe bits: four", ["run", str(t / "recipe-bits-word.yaml"), *out]),
        ("recipe", "recipe is a list, not a mapping", ["run", str(t / "recipe-list.yaml"), *out]),
        ("recipe", "--set without =", ["run", "w4a16-rtn", "--set", "stages.0.bits", *out]),
        ("recipe", "unknown built-in recipe", ["run", "w5a16-nope", *out]),
        ("dataset", "--dataset file does not exist", [*base, "--dataset", str(t / "absent.txt"), *out]),
        ("dataset", "--dataset empty file", [*base, "--dataset", str(t / "empty.txt"), *out]),
        ("dataset", "--dataset shorter than one sample", [*base, "--dataset", str(t / "short.txt"), *out]),
        ("dataset", "--dataset JSONL with a broken line", [*base, "--dataset", str(t / "bad.jsonl"), *out]),
        ("dataset", "--dataset CSV without a text column", [*base, "--dataset", str(t / "notext.csv"), *out]),
        ("dataset", "--dataset hub id while offline", [*base, "--dataset", "someorg/somedata", *out]),
        ("checkpoint", "model path does not exist", ["quantize", str(t / "absent-model"), *out]),
        ("checkpoint", "model folder without config.json", ["quantize", str(t / "no-config"), *out]),
        ("checkpoint", "model folder without weights", [*q[:1], str(t / "no-weights"), *q[2:], *out]),
        ("checkpoint", "pickle-only weights without --allow-pickle", [*q[:1], str(f["pickle"]), *q[2:], *out]),
        ("checkpoint", "shard index names ../../etc/passwd", [*q[:1], str(t / "index-escape"), *q[2:], *out]),
        ("checkpoint", "shard index names /etc/passwd", [*q[:1], str(t / "index-absolute"), *q[2:], *out]),
        ("checkpoint", "truncated safetensors", [*q[:1], str(t / "truncated"), *q[2:], *out]),
        ("checkpoint", "safetensors header length lies", [*q[:1], str(t / "header-lies"), *q[2:], *out]),
        ("checkpoint", "config.json is not JSON", [*q[:1], str(t / "config-not-json"), *q[2:], *out]),
        ("checkpoint", "re-quantizing a compressed checkpoint", [*q[:1], str(f["packed"]), *q[2:], *out]),
        ("checkpoint", "inspect: quantization_config bits 5", ["inspect", str(t / "packed-bits-5")]),
        ("checkpoint", "inspect: packed weights, no quantization_config", ["inspect", str(t / "packed-no-qconfig")]),
        ("checkpoint", "eval: packed weights, no quantization_config", ["eval", str(t / "packed-no-qconfig"),
                                                                        "--dataset", c, "--seq-len", "16"]),
    ]

    def one(case):
        area, what, args = case
        code, stderr, _ = cli(args)
        # progress lines ("[compress] model loaded 0.4 s", printed when stderr is not a terminal) are not the error
        lines = [ln for ln in stderr.replace(str(t), "<tmp>").splitlines() if not ln.startswith("[compress] ")]
        return {"area": area, "input": what, "exit_code": code, "message": lines[-1] if lines else "",
                "stderr_lines": len(lines), "traceback": "Traceback" in stderr,
                "output_left": (t / "out").exists()}

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(one, cases))


# ---------------------------------------------------------------- determinism and resume


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def quantize_json(method: str, out: Path, *extra: str, args: list[str] = GPTQ_ARGS) -> dict:
    """One `compress quantize --json` run: wall and CPU time of the subprocess, and its own sweep timing."""
    start, cpu = time.perf_counter(), child_cpu()
    done = subprocess.run([*CLI, "quantize", "--method", method, *args, "--output", str(out), *extra],
                          capture_output=True, text=True, env=ENV, timeout=900)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    return {"wall_s": time.perf_counter() - start, "cpu_s": child_cpu() - cpu,
            "compress_s": payload["timings"]["compress_s"], "stderr": done.stderr, "files": folder_hashes(out)}


def resume_model(tmp: Path) -> Path:
    """An 8-block Llama (hidden 256, random weights, the demo tokenizer): big enough that the sweep, not
    the start-up, dominates a run, which is the situation --resume is for."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from compress.models.load import DEMO_MODEL_DIR

    folder = tmp / "llama8"
    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=RESUME_BLOCKS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (DEMO_MODEL_DIR / name).is_file():
            shutil.copy(DEMO_MODEL_DIR / name, folder / name)
    return folder


def killed_then_resumed(out: Path, args: list[str], after_blocks: int) -> dict:
    """Start with --resume, SIGKILL once ``after_blocks`` blocks are saved, then the same command again."""
    progress = out.parent / f".{out.name}.partial" / "progress.json"
    start, cpu = time.perf_counter(), child_cpu()
    proc = subprocess.Popen([*CLI, "quantize", "--method", "gptq", *args, "--output", str(out), "--resume"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    saved = None
    while proc.poll() is None:
        try:
            saved = json.loads(progress.read_text())["completed_blocks"]
        except (OSError, ValueError, KeyError):
            saved = None
        if saved is not None and saved >= after_blocks:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    until_kill, cpu_until_kill = time.perf_counter() - start, child_cpu() - cpu
    assert saved is not None and not out.exists(), "the run finished before it could be killed"
    resumed = quantize_json("gptq", out, "--resume", args=args)
    message = next((ln for ln in resumed["stderr"].splitlines() if "resuming" in ln), "")
    return {**resumed, "killed_after_blocks": saved, "seconds_until_kill": until_kill,
            "cpu_until_kill_s": cpu_until_kill, "message": message}


def determinism_and_resume(tmp: Path) -> dict:
    runs = {}
    for method in ("rtn", "gptq"):
        results = [quantize_json(method, tmp / f"det-{method}-{i}" / ("deeper/" * i + "out")) for i in range(2)]
        runs[method] = {
            "identical": results[0]["files"] == results[1]["files"], "files": len(results[0]["files"]),
            "safetensors_sha256": [r["files"]["model.safetensors"] for r in results],
            "manifest_sha256": [r["files"]["manifest.json"] for r in results],
            "card_sha256": [r["files"]["README.md"] for r in results],
            "wall_s": [r["wall_s"] for r in results],
        }
    args = [str(resume_model(tmp)), *RESUME_ARGS]
    straight = [quantize_json("gptq", tmp / "resume-straight" / "out", args=args)]
    reference = straight[0]["files"]
    checkpointing = quantize_json("gptq", tmp / "resume-uninterrupted" / "out", "--resume", args=args)
    resumed = [killed_then_resumed(tmp / "resume-0" / "out", args, RESUME_BLOCKS // 2)]
    median = statistics.median
    straight_wall = median(r["wall_s"] for r in straight)
    resumed_wall = median(r["wall_s"] for r in resumed)
    return {
        "determinism": runs,
        "resume": {
            "blocks": RESUME_BLOCKS, "killed_after_blocks": [r["killed_after_blocks"] for r in resumed],
            "seconds_until_kill": [r["seconds_until_kill"] for r in resumed],
            "cpu_until_kill_s": [r["cpu_until_kill_s"] for r in resumed],
            "uninterrupted_cpu_s": [r["cpu_s"] for r in straight], "resumed_cpu_s": [r["cpu_s"] for r in resumed],
            "checkpointing_run_cpu_s": checkpointing["cpu_s"],
            "saved_cpu_s": median(r["cpu_s"] for r in straight) - median(r["cpu_s"] for r in resumed),
            "uninterrupted_wall_s": [r["wall_s"] for r in straight],
            "uninterrupted_sweep_s": [r["compress_s"] for r in straight],
            "resumed_wall_s": [r["wall_s"] for r in resumed], "resumed_sweep_s": [r["compress_s"] for r in resumed],
            "checkpointing_run_wall_s": checkpointing["wall_s"], "checkpointing_run_sweep_s": checkpointing["compress_s"],
            "saved_wall_s": straight_wall - resumed_wall,
            "saved_sweep_s": median(r["compress_s"] for r in straight) - median(r["compress_s"] for r in resumed),
            "identical_to_uninterrupted": all(r["files"] == reference for r in resumed)
            and checkpointing["files"] == reference,
            "files": len(reference), "resumed_message": resumed[0]["message"],
            "safetensors_sha256": resumed[0]["files"]["model.safetensors"],
        },
    }


# ---------------------------------------------------------------- fuzzing


def _mutate(rng: random.Random, data: bytes, limit: int | None = None) -> bytes:
    for _ in range(rng.randint(1, 4)):
        span = min(len(data), limit) if limit else len(data)
        at = rng.randrange(max(span, 1))
        kind = rng.choice(("flip", "replace", "insert", "delete", "truncate"))
        if kind == "flip" and data:
            data = data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:]
        elif kind == "replace":
            data = data[:at] + rng.randbytes(rng.randint(1, 8)) + data[at + 8:]
        elif kind == "insert":
            data = data[:at] + rng.choice([rng.randbytes(4), b"9999", b'"', b"..", b"/", b"[", b"{"]) + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + rng.randint(1, 8):]
        else:
            data = data[:at]
    return data


def fuzz(f: dict[str, Path], checkpoint_cases: int = 300, recipe_cases: int = 600) -> dict:
    import compress
    from compress.core.errors import CompressError
    from compress.recipes.loader import load_recipe

    rng = random.Random(0)
    outcomes: dict[str, dict[str, int]] = {}
    crashes: list[str] = []

    def record(target: str, fn) -> None:
        counts = outcomes.setdefault(target, {"tried": 0, "ok": 0, "compress_error": 0, "crash": 0})
        counts["tried"] += 1
        try:
            fn()
            counts["ok"] += 1
        except CompressError:
            counts["compress_error"] += 1
        except Exception as error:  # the property under test: this must never happen
            counts["crash"] += 1
            crashes.append(f"{target}: {type(error).__name__}: {str(error)[:120]}")

    packed = f["packed"]
    sharded = f["tmp"] / "fuzz-sharded"
    shutil.copytree(packed, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(str(sharded / "model-00001-of-00001.safetensors"), "pt") as handle:
        index = json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in handle.keys()}}).encode()  # noqa: SIM118
    weights = (packed / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(weights[:8], "little")
    config = (packed / "config.json").read_bytes()
    targets = {
        "config.json": lambda d: (d / "config.json").write_bytes(_mutate(rng, config)),
        "safetensors header": lambda d: (d / "model.safetensors").write_bytes(_mutate(rng, weights, header_end)),
        "safetensors random bytes": lambda d: (d / "model.safetensors").write_bytes(rng.randbytes(rng.randint(0, 300))),
        "shard index": lambda d: (d / "model.safetensors.index.json").write_bytes(_mutate(rng, index)),
    }
    with tempfile.TemporaryDirectory() as scratch:
        for case in range(checkpoint_cases):
            name = list(targets)[case % len(targets)]
            folder = Path(scratch) / f"c{case}"
            shutil.copytree(sharded if name == "shard index" else packed, folder)
            targets[name](folder)
            record(name, lambda folder=folder: compress.load(folder, device="cpu", kernel="reference"))
            shutil.rmtree(folder)
        seed_recipe = (ROOT / "src/compress/recipes/presets/w4a16-gptq.yaml").read_bytes()
        path = Path(scratch) / "recipe.yaml"
        for case in range(recipe_cases):
            text = _mutate(rng, seed_recipe) if case % 2 == 0 else rng.randbytes(rng.randint(0, 200))
            path.write_bytes(text)
            record("recipe YAML (mutated)" if case % 2 == 0 else "recipe YAML (random bytes)",
                   lambda: load_recipe(str(path)))
    total = sum(o["tried"] for o in outcomes.values())
    return {"cases": total, "crashes": len(crashes), "by_target": outcomes, "crash_examples": crashes[:10]}


# ---------------------------------------------------------------- report


def markdown(table: list[dict], det: dict, fz: dict) -> str:
    two = [r for r in table if r["exit_code"] == 2]
    clean = [r for r in two if r["stderr_lines"] == 1 and not r["traceback"] and not r["output_left"]]
    lines = [
        "# Release checks",
        "",
        f"## Bad inputs: {len(table)} cases, {len(two)} exit 2, {len(clean)} of those with exactly one stderr "
        "line, no traceback and no output folder left",
        "",
        "Each row ran the real console script (`python -m compress.cli.main ...`) in a subprocess; `<tmp>` is the",
        "scratch folder of the run. The message column is the last stderr line; the lines column counts them.",
        "",
        "| area | input | exit | lines | message (stderr) |",
        "|---|---|---|---|---|",
    ]
    for r in table:
        message = r["message"].replace("|", "\\|")
        lines.append(f"| {r['area']} | {r['input']} | {r['exit_code']} | {r['stderr_lines']} | {message} |")
    lines += ["", "## Determinism (same recipe twice, different output folders, CPU)", "",
              "| method | files | all identical | model.safetensors sha256 (run 1 / run 2) | manifest.json sha256 "
              "(run 1 / run 2) | README.md sha256 (run 1 / run 2) |", "|---|---|---|---|---|---|"]
    for method, r in det["determinism"].items():
        lines.append(f"| {method} | {r['files']} | {r['identical']} | `{r['safetensors_sha256'][0][:16]}` / "
                     f"`{r['safetensors_sha256'][1][:16]}` | `{r['manifest_sha256'][0][:16]}` / "
                     f"`{r['manifest_sha256'][1][:16]}` | `{r['card_sha256'][0][:16]}` / `{r['card_sha256'][1][:16]}` |")
    rs = det["resume"]

    def secs(values: list[float]) -> str:
        return " / ".join(f"{v:.1f}" for v in values) + " s"

    lines += ["", f"## Resume after SIGKILL (GPTQ W4g128 on an {rs['blocks']}-block Llama, hidden 256, 64 samples x "
              "128 tokens, 1 thread)", "",
              "The machine's 2 cores were shared with other jobs while this ran, so wall times are noisy; CPU time",
              "(user + sys of the process) is the fair comparison. Sweep = the run's own `timings.compress_s`.", "",
              f"- killed with SIGKILL once {rs['killed_after_blocks'][0]} of {rs['blocks']} blocks were saved "
              f"({secs(rs['seconds_until_kill'])} into the run), then the same command re-run with `--resume`",
              f"- CPU spent before the kill: {secs(rs['cpu_until_kill_s'])}",
              f"- uninterrupted run: CPU {secs(rs['uninterrupted_cpu_s'])}, wall {secs(rs['uninterrupted_wall_s'])}, "
              f"sweep {secs(rs['uninterrupted_sweep_s'])}",
              f"- the same command with `--resume` after the kill: CPU {secs(rs['resumed_cpu_s'])}, wall "
              f"{secs(rs['resumed_wall_s'])}, sweep {secs(rs['resumed_sweep_s'])}",
              f"- saved over starting again: {rs['saved_cpu_s']:.1f} s CPU "
              f"({rs['saved_cpu_s'] / statistics.median(rs['uninterrupted_cpu_s']):.0%} of an uninterrupted run), "
              f"{rs['saved_wall_s']:.1f} s wall",
              f"- cost of checkpointing, an uninterrupted run with `--resume`: CPU {rs['checkpointing_run_cpu_s']:.1f} s, "
              f"wall {rs['checkpointing_run_wall_s']:.1f} s, sweep {rs['checkpointing_run_sweep_s']:.1f} s",
              f"- resumed outputs (and the checkpointing run) identical to the uninterrupted run, file by file: "
              f"{rs['identical_to_uninterrupted']} ({rs['files']} files; model.safetensors "
              f"`{rs['safetensors_sha256'][:16]}`)",
              f"- stderr said: `{rs['resumed_message'].replace(str(Path(tempfile.gettempdir())), '/tmp')}`",
              "", f"## Fuzzing: {fz['cases']} cases, crashes: {fz['crashes']}", "",
              "A crash is any exception other than CompressError (which the CLI turns into one sentence, exit 2).",
              "", "| target | tried | loaded | CompressError | crash |", "|---|---|---|---|---|"]
    for target, o in fz["by_target"].items():
        lines.append(f"| {target} | {o['tried']} | {o['ok']} | {o['compress_error']} | {o['crash']} |")
    for crash in fz["crash_examples"]:
        lines.append(f"- {crash}")
    return "\n".join(lines)


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        det = determinism_and_resume(tmp)
        print(json.dumps(det["resume"], indent=1, default=str), flush=True)
        fixtures = build_fixtures(tmp)
        table = bad_inputs(fixtures)
        fz = fuzz(fixtures)
    write_results("release", {"bad_inputs": table, **det, "fuzz": fz}, markdown(table, det, fz))


if __name__ == "__main__":
    main()

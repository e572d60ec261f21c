"""GPTQ W4g128 (symmetric, group 128) of `compress quantize` against llm-compressor's GPTQModifier (W4A16) on
the same model files, the same calibration tokens, the same machine, back to back: whole-process wall time and
peak RSS of each tool (medians over interleaved repeats A B A B ...), the time of each tool's compression step,
and the quality of both outputs on the same held-out windows (our `compress eval --baseline`, which reads
llm-compressor's pack-quantized checkpoint; cross-checked once by llm-compressor's own loader). Also the wall
time of our RTN on the demo model.

The peer lives in its own venv, outside the repo (it pins an older transformers):

    python -m venv /work/bench-venv
    /work/bench-venv/bin/pip install torch==2.13.0      # first: the CPU build; a bare torch pulls CUDA
    /work/bench-venv/bin/pip install llmcompressor

Run:  python benchmarks/speed_vs_peers.py [--quick] [--long] [--peer-python /work/bench-venv/bin/python]
      → benchmarks/results/speed_vs_peers.json|md
      --quick: one repeat;  --long: also 128 x 2048 tokens on an OPT built with a 2048-token context.

Models: the embedded demo Llama (context 256, so 128 x 256 there), and a random-init OPT of 3.8M parameters
(hidden 256, ffn 1024, 4 layers, 512 positions, the demo tokenizer: the issue's model) built from config and
saved as safetensors. Calibration: compress's own calibration_samples(demo-calib, seed 0) tensor is handed to
llm-compressor as a datasets.Dataset of input_ids / attention_mask; our CLI draws the same windows from the
same flags, and the script checks that the fingerprints match. Both run with the same thread count
(OMP_NUM_THREADS / MKL_NUM_THREADS and torch.set_num_threads, --threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "_peer_llmcompressor.py"
DEFAULT_PEER = "/work/bench-venv/bin/python"
NUM_SAMPLES = 128
# OPT of the issue: 3.8M parameters. The linear layers (what GPTQ works on) are the same in the 2048-context one.
OPT = {"vocab_size": 2048, "hidden_size": 256, "word_embed_proj_dim": 256, "ffn_dim": 1024, "num_hidden_layers": 4,
       "num_attention_heads": 4}


def build_opt(folder: Path, positions: int) -> int:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from compress.models.load import DEMO_MODEL_DIR, load_tokenizer

    tok = load_tokenizer(str(DEMO_MODEL_DIR))
    torch.manual_seed(0)
    config = OPTConfig(**OPT, max_position_embeddings=positions, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config.architectures = ["OPTForCausalLM"]
    model = OPTForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def token_files(model: str, num_samples: int, seq_len: int, folder: Path) -> dict:
    """The exact calibration ids (what our CLI draws for these flags) and the eval windows, saved for the peer."""
    import torch

    from compress.calibrate.data import calibration_samples, eval_windows
    from compress.models.load import load_tokenizer

    tok = load_tokenizer(model)
    calib = calibration_samples(tok, "demo-calib", num_samples, seq_len, seed=0)
    calib_path, win_path = folder / f"calib-{seq_len}.pt", folder / f"windows-{seq_len}.pt"
    torch.save(calib.input_ids.clone(), calib_path)
    eval_len = min(seq_len, 512)
    torch.save(eval_windows(tok, "demo-heldout", eval_len), win_path)
    return {"calib": calib_path, "windows": win_path, "fingerprint": calib.fingerprint,
            "stream_tokens": calib.total_tokens, "eval_seq_len": eval_len}


def timed(cmd: list[str], env: dict, log: Path) -> dict:
    """Run CMD as its own process; wall clock, the kernel's user+sys and peak RSS of that child (wait4)."""
    with open(log, "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    try:
        report = json.loads(out)
    except json.JSONDecodeError:  # llm-compressor logs to stdout too: its report is the last line
        last = out.strip().splitlines()[-1] if out.strip() else "{}"
        report = json.loads(last[last.index("{"):]) if "{" in last else {}
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            "report": report}


def ours_cmd(model: str, num_samples: int, seq_len: int, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return ["compress", "quantize", model, "--bits", "4", "--group-size", "128", "--sym", "--num-samples",
            str(num_samples), "--seq-len", str(seq_len), "--dataset", "demo-calib", "--seed", "0", "--no-eval",
            "-o", str(out), "--overwrite", "--json", *extra]


def step_s(tool: str, report: dict) -> float:
    if tool == "llm-compressor":
        return report["oneshot_s"]  # calibration forwards + GPTQ, inside oneshot()
    t = report["timings"]
    return t["calibration_s"] + t["compress_s"]  # tokenise/draw windows + block-wise forwards and GPTQ


def evaluate(out: Path, model: str, seq_len: int, env: dict) -> dict:
    done = subprocess.run(["compress", "eval", str(out), "--baseline", model, "--seq-len", str(seq_len), "--json"],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-1500:]}
    m = json.loads(done.stdout)
    return {k: m[k] for k in ("ppl", "baseline_ppl", "ppl_increase", "kl", "top1", "tokens", "windows", "size_bytes")}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat of each (default 3)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--long", action="store_true", help="also 128 x 2048 tokens (OPT with 2048 positions)")
    parser.add_argument("--models", nargs="+", default=["demo", "opt"], help="demo, opt, or a model folder")
    parser.add_argument("--num-samples", type=int, default=NUM_SAMPLES, help="calibration samples (default 128)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for every tool (default 1: on 2 shared cores, 2 OpenMP threads spin-wait on each other whenever anything else runs, which inflates both tools' CPU time ~3x)")
    parser.add_argument("--peer-python", default=os.environ.get("PEER_PYTHON", DEFAULT_PEER))
    parser.add_argument("--no-matched", action="store_true",
                        help="skip our run with llm-compressor's settings (act-order static groups, minmax; "
                        "one run, in the first round)")
    parser.add_argument("--name", default="speed_vs_peers")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    began = time.perf_counter()

    from compress.models.load import DEMO_MODEL_DIR

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    peer_ok = Path(args.peer_python).exists()
    peer_versions: dict = {}
    if peer_ok:
        got = subprocess.run([args.peer_python, "-c", "import json, importlib.metadata as m; print(json.dumps("
                              "{p: m.version(p) for p in ('llmcompressor', 'compressed-tensors', 'transformers', "
                              "'torch', 'accelerate', 'datasets')}))"], capture_output=True, text=True)
        peer_versions = json.loads(got.stdout) if got.returncode == 0 else {"error": got.stderr[-500:]}
    else:
        print(f"peer python {args.peer_python} not found: timing ours only (see the docstring to install)")
    import importlib.metadata as md

    ours_versions = {p: md.version(p) for p in ("torch", "transformers")}
    ours_versions["compress"] = md.version("compress-toolkit")
    ours_versions["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                             text=True, cwd=HERE).stdout.strip()

    cases: list[dict] = []
    rtn: dict = {}
    with tempfile.TemporaryDirectory(prefix="speed_vs_peers-") as tmp_s:
        tmp = Path(tmp_s)
        logs = tmp / "logs"
        logs.mkdir()
        # warm the page cache and bytecode of both tool stacks (not timed)
        subprocess.run(["compress", "--help"], capture_output=True, env=env)
        if peer_ok:
            subprocess.run([args.peer_python, "-c", "import llmcompressor, transformers, datasets"],
                           capture_output=True, env=env)
        plan: list[tuple[str, str, int, int]] = []  # label, folder, seq_len, parameters
        for name in args.models:
            if name == "demo":
                plan.append(("demo (Llama, 1.3M)", str(DEMO_MODEL_DIR), 256, 0))
            elif name == "opt":
                folder = tmp / "opt-512"
                n = build_opt(folder, 512)
                plan.append((f"OPT random init ({n / 1e6:.1f}M)", str(folder), 512, n))
                if args.long:
                    folder = tmp / "opt-2048"
                    n = build_opt(folder, 2048)
                    plan.append((f"OPT random init, 2048 positions ({n / 1e6:.1f}M)", str(folder), 2048, n))
            else:
                plan.append((Path(name).name, name, 512, 0))
        for label, model, seq_len, _ in plan:
            files = token_files(model, args.num_samples, seq_len, tmp)
            tools = ["compress"] + (["llm-compressor"] if peer_ok else []) + (
                [] if args.no_matched else ["compress, peer's settings"])
            runs: dict[str, list[dict]] = {t: [] for t in tools}
            outs: dict[str, Path] = {}
            for r in range(repeats):
                for k, tool in enumerate(tools):
                    if tool == "compress, peer's settings" and r > 0:
                        continue
                    out = tmp / f"out-{len(cases)}-{k}-{r}"
                    if tool == "compress":
                        cmd = ours_cmd(model, args.num_samples, seq_len, out)
                    elif tool == "compress, peer's settings":
                        cmd = ours_cmd(model, args.num_samples, seq_len, out,
                                       ("--act-order", "--static-groups", "--observer", "minmax"))
                    else:
                        cmd = [args.peer_python, str(DRIVER), model, str(files["calib"]), str(out),
                               "--threads", str(args.threads)]
                    got = timed(cmd, env, logs / f"{out.name}.log")
                    got["step_s"] = step_s(tool, got["report"])
                    if tool.startswith("compress"):
                        fp = got["report"]["calibration"]["fingerprint"]
                        if fp != files["fingerprint"]:
                            raise RuntimeError(f"{label}: our CLI drew other calibration tokens ({fp}) than the "
                                               f"tensor given to the peer ({files['fingerprint']})")
                    runs[tool].append(got)
                    outs.setdefault(tool, out)
                    print(f"{label} {args.num_samples}x{seq_len} {tool} run {r + 1}: wall {got['wall_s']:.1f} s, step "
                          f"{got['step_s']:.1f} s, peak {got['peak_rss_mb']:.0f} MB", flush=True)
            quality = {tool: evaluate(out, model, files["eval_seq_len"], env) for tool, out in outs.items()}
            cross = None
            if peer_ok and "llm-compressor" in outs:
                done = subprocess.run([args.peer_python, str(DRIVER), "--ppl", str(files["windows"]),
                                       str(outs["llm-compressor"])], capture_output=True, text=True, env=env)
                cross = (json.loads(done.stdout.strip().splitlines()[-1])["ppl"][str(outs["llm-compressor"])]
                         if done.returncode == 0 else {"error": done.stderr[-1500:]})
            case = {"model": label, "model_path": model if "assets" in model else "built from config",
                    "num_samples": args.num_samples, "seq_len": seq_len, "calibration_fingerprint": files["fingerprint"],
                    "calibration_stream_tokens": files["stream_tokens"], "eval_seq_len": files["eval_seq_len"],
                    "peer_own_loader_ppl": cross, "tools": {}}
            for tool, rs in runs.items():
                case["tools"][tool] = {"wall_s": summary([x["wall_s"] for x in rs]),
                                       "step_s": summary([x["step_s"] for x in rs]),
                                       "cpu_s": summary([x["cpu_s"] for x in rs]),
                                       "peak_rss_mb": summary([x["peak_rss_mb"] for x in rs]),
                                       "quality": quality[tool], "report": rs[0]["report"]}
            if "llm-compressor" in runs:
                for tool in runs:
                    if tool == "llm-compressor":
                        continue
                    pairs = list(zip(runs[tool], runs["llm-compressor"], strict=False))
                    case["tools"][tool]["vs_peer"] = {
                        k: statistics.median(a[k] / b[k] for a, b in pairs) for k in ("wall_s", "step_s", "peak_rss_mb")}
            cases.append(case)

        # RTN on the demo model, the whole `compress quantize --method rtn` process (target <= 2 s)
        for variant, extra in (("--no-eval", ["--no-eval"]), ("with eval (default)", [])):
            rs = []
            for r in range(max(repeats, 3)):
                out = tmp / f"rtn-{len(extra)}-{r}"
                cmd = ["compress", "quantize", "--method", "rtn", "--bits", "4", "--group-size", "128", "-o", str(out),
                       "--overwrite", "--json", *extra]
                rs.append(timed(cmd, env, logs / f"{out.name}.log"))
            rtn[variant] = {"wall_s": summary([x["wall_s"] for x in rs]),
                            "compress_s": summary([x["report"]["timings"]["compress_s"] for x in rs]),
                            "load_s": summary([x["report"]["timings"]["load_s"] for x in rs]),
                            "in_process_s": summary([x["report"]["timings"]["wall_s"] for x in rs]),
                            "peak_rss_mb": summary([x["peak_rss_mb"] for x in rs])}
            print(f"RTN demo {variant}: wall {rtn[variant]['wall_s']['median']:.2f} s", flush=True)

    elapsed = time.perf_counter() - began
    write_results(args.name, {"repeats": repeats, "threads": args.threads, "ours": ours_versions,
                              "peer": peer_versions, "cases": cases, "rtn_demo": rtn, "elapsed_s": elapsed},
                  markdown(cases, rtn, repeats, args.threads, ours_versions, peer_versions, elapsed))


def markdown(cases: list[dict], rtn: dict, repeats: int, threads: int, ours: dict, peer: dict, elapsed: float) -> str:
    from _common import machine

    mach = machine()
    fmt = lambda s: f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"  # noqa: E731
    lines = ["# GPTQ W4g128 (sym) vs llm-compressor GPTQModifier W4A16, same model, tokens and machine", "",
             f"{mach['cpu']}, {mach['cores']} cores (shared), {threads} threads for every tool; "
             f"{repeats} interleaved repeat(s) of compress and llm-compressor (A B A B ...; \"peer's settings\" "
             "once, in the first round), medians (min–max). "
             f"compress {ours['compress']} @ {ours['commit']} (torch {ours['torch']}, transformers "
             f"{ours['transformers']}); llm-compressor {peer.get('llmcompressor', 'n/a')} (compressed-tensors "
             f"{peer.get('compressed-tensors', 'n/a')}, transformers {peer.get('transformers', 'n/a')}, torch "
             f"{peer.get('torch', 'n/a')}) in its own venv. {mach['date']}, {elapsed / 60:.1f} min in all.", "",
             "| model | tokens | tool | wall s | step s | peak RSS MB | ours/peer wall | ours/peer step | "
             "ours/peer RSS | KL | ppl (fp32) | top-1 | runs |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        for tool, t in c["tools"].items():
            q, v = t["quality"], t.get("vs_peer")
            ratio = (f"{v['wall_s']:.2f}× | {v['step_s']:.2f}× | {v['peak_rss_mb']:.2f}×" if v else "– | – | –")
            qual = (f"{q['kl']:.4f} | {q['ppl']:.3f} ({q['baseline_ppl']:.3f}) | {q['top1'] * 100:.1f}%"
                    if "kl" in q else "eval failed | | ")
            lines.append(f"| {c['model']} | {c['num_samples']}×{c['seq_len']} | {tool} | {fmt(t['wall_s'])} | "
                         f"{fmt(t['step_s'])} | {t['peak_rss_mb']['median']:.0f} | {ratio} | {qual} | {len(t['wall_s']['runs'])} |")
    lines += ["", "- wall: the whole process (start-up, imports, load, calibration, GPTQ, save), wait4 of the child; "
              "peak RSS: that child's ru_maxrss. Ratios: median of the per-repeat ratios (same round).",
              "- step: ours `timings.calibration_s + compress_s` from `--json` (drawing the windows, the block-wise "
              "forwards and GPTQ); llm-compressor: `oneshot()` (its calibration forwards and GPTQ; the "
              "Dataset is built from the same token tensor before it).",
              "- compress: the CLI's defaults for W4g128 (MSE scale search, no act-order). \"peer's settings\": "
              "`--act-order --static-groups --observer minmax`, what GPTQModifier W4A16 does by default "
              "(actorder static, memoryless_minmax observer, dampening 0.01, block 128).",
              "- Calibration: compress's calibration_samples(demo-calib, seed 0) tensor for both (fingerprints "
              "checked against our CLI's manifest). Quality: `compress eval OUT --baseline MODEL` on the same "
              "demo-heldout windows for every output (it reads llm-compressor's pack-quantized checkpoint)."]
    for c in cases:
        cross = c["peer_own_loader_ppl"]
        peer_q = c["tools"].get("llm-compressor", {}).get("quality", {})
        if isinstance(cross, float) and "ppl" in peer_q:
            lines.append(f"- Cross-check, {c['model']}: llm-compressor's own loader (transformers + compressed-tensors "
                         f"decompression) gives ppl {cross:.3f} for its output on the same windows; our eval "
                         f"{peer_q['ppl']:.3f}.")
    if any("random" in c["model"] for c in cases):
        lines.append("- The OPT has random weights (as in the issue): its KL/ppl only show both outputs load and "
                     "run; the demo model's figures are the quality comparison.")
    if rtn:
        lines += ["", "## RTN W4g128 on the demo model (`compress quantize --method rtn --bits 4 --group-size 128`)",
                  "", "| variant | wall s (whole process) | in-process s (`timings.wall_s`) | load s | compress step s | "
                  "peak RSS MB |", "|---|---|---|---|---|---|"]
        for variant, r in rtn.items():
            lines.append(f"| {variant} | {r['wall_s']['median']:.2f} ({r['wall_s']['min']:.2f}–{r['wall_s']['max']:.2f}) "
                         f"| {r['in_process_s']['median']:.2f} | {r['load_s']['median']:.2f} | "
                         f"{r['compress_s']['median']:.3f} | {r['peak_rss_mb']['median']:.0f} |")
        lines.append(f"\nTarget ≤ 2 s: {'met' if rtn['--no-eval']['wall_s']['median'] <= 2 else 'NOT met'} "
                     f"(--no-eval, median); the rest of the wall time is the interpreter start and imports.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""``README.md`` model card: what was done to the model, how to load it, how it measured.

Why it is written by the tool and not by hand: a release folder should explain itself to whoever finds
it on a hub or a disk, and that text must agree with the artifact. It is built only from the recipe,
the layers' records (``compress.core.records``) and the eval metrics, never from a clock, a host name or
the output path, so two
runs of the same recipe write the same card, and it is written before ``manifest.json`` so its hash is
recorded and ``compress verify`` covers it like every other file.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from compress.codecs import CODECS, Codec
from compress.core.records import LayerRecord

CARD_NAME = "README.md"

_METRICS = (  # eval key → row label, in the order a reader wants them
    ("baseline_ppl", "perplexity of the original"),
    ("ppl", "perplexity"),
    ("ppl_increase", "perplexity increase"),
    ("kl", "KL to the original (nats/token)"),
    ("top1", "top-1 agreement with the original"),
    ("cosine", "embedding cosine to the original (mean)"),
    ("cosine_min", "embedding cosine to the original (min)"),
    ("spearman", "similarity rank correlation"),
    ("compression_ratio", "compression ratio (bytes before / after)"),
)


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key in ("ppl_increase", "top1"):
        return f"{value * 100:+.2f}%" if key == "ppl_increase" else f"{value * 100:.2f}%"
    if key == "compression_ratio":
        return f"{value:.2f}x"
    return f"{value:.6g}"


def _stage_tags(records: list[LayerRecord], method: str, nth: int) -> list[str]:
    """The tag each layer got from the ``nth`` stage running ``method`` (a layer's record keeps every
    stage's method and tag, in order)."""
    tags = []
    for record in records:
        at = [i for i, m in enumerate(record.methods) if m == method]
        if len(at) > nth:
            tags.append(record.tags[at[nth]])
    return tags


def _stage_rows(recipe: dict[str, Any], records: list[LayerRecord]) -> list[str]:
    rows = ["| stage | method | scheme | layers | settings |", "|---|---|---|---|---|"]
    stages = recipe.get("stages") or []
    for index, stage in enumerate(stages):
        method = stage.get("method", "?")
        nth = sum(1 for earlier in stages[:index] if earlier.get("method") == method)
        tags = _stage_tags(records, method, nth)
        schemes = ", ".join(f"{s} ({n})" for s, n in sorted(Counter(tags).items()))
        settings = ", ".join(f"{k}={v}" for k, v in stage.items() if k not in ("method", "ignore") and v is not None)
        rows.append(f"| {index} | {method} | {schemes or '-'} | {len(tags)} | {settings or '-'} |")
    return rows


def _counted(counter: Counter) -> str:
    return ", ".join(f"{value} ({n} layer{'s' if n != 1 else ''})" for value, n in sorted(counter.items()))


def _record_lines(records: list[LayerRecord]) -> list[str]:
    """One sentence on what the per-layer records add to the table: patterns, observers, act-order."""
    facts = []
    sparsity = Counter(r.sparsity for r in records if r.sparsity is not None)
    if sparsity:
        facts.append(f"sparsity {_counted(sparsity)}")
    observers = Counter(r.observer for r in records if r.observer is not None)
    if observers:
        facts.append(f"scales chosen by {_counted(observers)}")
    ordered = sum(1 for r in records if r.actorder == "weight")
    if ordered:
        facts.append(f"columns solved in activation order (`actorder: weight`) in {ordered} layers")
    if not facts:
        return []
    return [f"Per layer (`manifest.json` lists each one): {'; '.join(facts)}.", ""]


def layout_of(folder: Path) -> str:
    """The layout of a written folder: ``sparse-bitmask`` (the opt-in compact sparse files), ``gptq``, a
    compressed-tensors format, or ``dense`` (a plain checkpoint)."""
    if any(Path(folder).glob("sparse-bitmask*.safetensors")):
        return "sparse-bitmask"
    try:
        quant = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return "dense"
    if not isinstance(quant, dict):
        return "dense"
    if quant.get("quant_method") == "gptq":
        return "gptq"
    return str(quant.get("format") or "compressed-tensors")


def _asymmetric(recipe: dict[str, Any]) -> bool:
    return any(stage.get("symmetric") is False for stage in recipe.get("stages") or [])


def _vllm_serves(recipe: dict[str, Any] | None) -> bool:
    """vLLM's weight-only paths (Marlin / GPTQ-Marlin) serve symmetric 4- and 8-bit weights; other widths,
    zero points and quantized inputs (W4A8 is pack-quantized too, served by other vLLM kernels we do not
    test) are not claimed."""
    stages = [s for s in (recipe or {}).get("stages") or [] if s.get("bits") is not None]
    return bool(stages) and all(s.get("bits") in (4, 8) and s.get("symmetric", True)
                                and s.get("activations", "none") == "none" for s in stages)


_VLLM = ["", "vLLM serves symmetric 4- and 8-bit weights like these:", "", "```", "vllm serve path/to/this/folder",
         "```"]


def _load_section(fmt: str, recipe: dict[str, Any] | None = None) -> list[str]:
    """How to load the folder, naming only the readers it was checked against (README: interop tests)."""
    lines = [
        "## How to load it",
        "",
        "With compress (packed layers run through its kernels; `kernel=\"reference\"` is the exact path):",
        "",
        "```python",
        "import compress",
        "model = compress.load(\"path/to/this/folder\", device=\"auto\")",
        "```",
        "",
    ]
    if fmt == "dense":
        return lines + [
            "This folder is a plain transformers checkpoint (no `quantization_config`; pruned weights are",
            "stored densely with their zeros): any reader of the architecture loads it, e.g.",
            "`AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")`. Zeros are computed densely,",
            "so pruning shrinks nothing at run time without a sparse kernel.",
        ]
    codec = CODECS.get(fmt) if fmt in CODECS else None  # None: several layouts (mixed-precision)
    lines += [line.format(name=fmt) for line in (codec.readers if codec is not None else Codec.readers)]
    if codec is not None and not codec.quantized:
        return lines
    if fmt == "gptq":
        return lines + (_VLLM if _vllm_serves(recipe) else [])
    if fmt == "pack-quantized" and _vllm_serves(recipe):
        lines += _VLLM
    if recipe is not None and _asymmetric(recipe):
        lines += [
            "",
            "Asymmetric weights (with zero points): transformers 5.23 and 5.24 fail to load any asymmetric",
            "`pack-quantized` checkpoint (a zero-point shape check on their side; 5.22 loads it). Work around",
            "it with `quantization_config=CompressedTensorsConfig(dequantize=True)` or use `compress.load`.",
        ]
    return lines


def _eval_section(evaluation: dict[str, Any] | None) -> list[str]:
    lines = ["## Evaluation", ""]
    shown = [(label, _fmt(key, evaluation[key])) for key, label in _METRICS if evaluation and key in evaluation]
    if not shown:
        return [*lines, "The export was not evaluated (`eval.enabled: false`)."]
    where = ""
    if evaluation.get("dataset"):
        where = f"Measured on the exported files, on `{evaluation['dataset']}`"
        if evaluation.get("windows") is not None:
            where += f" ({evaluation['windows']} windows x {evaluation.get('seq_len')} tokens)"
        where += "."
    lines += [where, "", "| metric | value |", "|---|---|"] if where else ["| metric | value |", "|---|---|"]
    lines += [f"| {label} | {value} |" for label, value in shown]
    return lines


def _lowrank_section(records: list[LayerRecord]) -> list[str]:
    """How to use the low-rank compensation adapter (``compress.export.adapter``), when layers carry one."""
    ranks = Counter(r.lowrank for r in records if r.lowrank is not None)
    if not ranks:
        return []
    return [
        "## Low-rank error compensation",
        "",
        f"{sum(ranks.values())} layers carry low-rank factors of their quantization error (rank "
        f"{_counted(ranks)}; EoRA: fitted in the activation-weighted norm on the calibration data), so each",
        "computes `Ŵx + B(Ax)`. The factors are a PEFT LoRA adapter in `lowrank/` (`lora_alpha = r`); the main",
        "checkpoint above does not include them. `compress.load(\"path/to/this/folder\")` applies them. With",
        "transformers, load the model as above, then attach the adapter (checked with peft 0.21 on transformers",
        "5.24 + compressed-tensors 0.20):",
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(model, \"path/to/this/folder/lowrank\")",
        "```",
        "",
        "Without it, transformers, vLLM and the other readers serve the plain quantized model (its eval below",
        "is measured with the compensation, through `compress.load`).",
        "",
    ]


def render_card(*, source_model: str, recipe: dict[str, Any], calibration: dict[str, Any] | None,
                evaluation: dict[str, Any] | None,
                records: Mapping[str, LayerRecord] | Iterable[LayerRecord], tool_version: str,
                layout: str = "pack-quantized") -> str:
    """The card's Markdown; a pure function of its arguments (tested for byte-stability). ``records``: one
    record per compressed layer (``LayerRecords``, or the records themselves)."""
    fmt = layout
    layers = list(records.values() if isinstance(records, Mapping) else records)
    schemes = sorted({tag for record in layers for tag in record.tags})
    methods = ", ".join(str(stage.get("method")) for stage in recipe.get("stages") or []) or "no stage"
    ignore = sorted({p for stage in recipe.get("stages") or [] for p in (stage.get("ignore") or [])})
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- compress-toolkit",
        *([] if fmt in ("dense", "sparse-bitmask") else ["- compressed-tensors"] if fmt != "gptq" else ["- gptq"]),
        *([f"- {fmt}"] if fmt not in ("dense", "gptq") else []),
        *[f"- {s}" for s in schemes],
        "---",
        "",
        f"# {source_model}, compressed ({', '.join(schemes) or methods})",
        "",
        f"Made by compress-toolkit {tool_version} from `{source_model}`. `recipe.yaml` in this folder",
        "reproduces it (`compress run recipe.yaml`); `manifest.json` records the sha256 of every file,",
        "the library versions and the calibration fingerprint; `compress verify path/to/this/folder`",
        "checks the files against it.",
        "",
        "## What was done",
        "",
        *_stage_rows(recipe, layers),
        "",
        *_record_lines(layers),
        f"Layers left dense by pattern: {', '.join(f'`{p}`' for p in ignore)}." if ignore else
        "Layers outside the decoder blocks (embeddings, norms, the LM head) are left dense.",
        "",
    ]
    if calibration:
        lines += [
            f"Calibration data (read only by data-dependent methods): `{calibration.get('dataset')}`, "
            f"{calibration.get('num_samples')} samples x "
            f"{calibration.get('seq_len')} tokens (seed {calibration.get('seed')}, fingerprint "
            f"`{calibration.get('fingerprint')}`).",
            "",
        ]
    lines += [*_load_section(fmt, recipe), "", *_lowrank_section(layers), *_eval_section(evaluation)]
    return "\n".join(lines).rstrip() + "\n"


def write_card(folder: Path, **fields: Any) -> Path:
    """Write ``README.md`` into ``folder`` (call before ``write_manifest`` so the card is hashed)."""
    path = Path(folder) / CARD_NAME
    fields.setdefault("layout", layout_of(folder))
    path.write_text(render_card(**fields), encoding="utf-8")
    return path

"""Evaluate what we ship: the exported folder (or any HF model folder), optionally against a baseline.

Causal LMs: perplexity over non-overlapping held-out windows, and against a baseline the relative
perplexity increase, mean KL(p_base ‖ p_model) and top-1 agreement. Encoders: cosine similarity of
mean-pooled embeddings to the baseline's (perplexity does not apply).

What the data and the gates allow is checked first, from paths and the model's config only
(:func:`check_before_load` for a run, the same checks at the top of :func:`evaluate`), so a bad eval setting
is refused before any weights load rather than after a whole compression run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compress.calibrate.data import check_source, eval_windows, load_texts
from compress.core.errors import CompressError
from compress.evaluate.gates import check_gates_apply
from compress.evaluate.metrics import compare_embeddings, compare_lm, perplexity
from compress.evaluate.size import dir_size_bytes
from compress.export.load import load as load_compressed
from compress.models.load import load_config, load_model, load_tokenizer, model_kind, resolve_model_source
from compress.recipes.schema import EvalConfig

Progress = Callable[[str, int, int], None]
_MAX_TEXTS = 256
"""Encoders: texts compared by default (``max_windows`` overrides it)."""


def is_compressed(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        if "quantization_config" in json.loads(config.read_text(encoding="utf-8")):
            return True
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CompressError(f"config {config} is not valid JSON") from None
    return _has_packed_tensors(Path(path))


def _has_packed_tensors(folder: Path) -> bool:
    """Tensors of a compressed layout without a quantization_config must reach ``compress.load`` (which
    refuses them), not transformers (which would run the architecture on uninitialised weights). Which names
    make a layout is each registered codec's to say (``Codec.claims``), so a new layout is covered too."""
    from safetensors import SafetensorError, safe_open

    from compress.evaluate.size import stored_layers

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                if stored_layers(handle.keys()):
                    return True
        except (SafetensorError, OSError):
            return True  # let compress.load name the broken file
    return False


def load_any(path: str, *, trust_remote_code: bool = False, allow_pickle: bool = False,
             kernel: str = "reference") -> torch.nn.Module:
    """A compressed checkpoint through ``compress.load``, anything else through transformers."""
    if is_compressed(path):
        return load_compressed(path, device="cpu", kernel=kernel)
    return load_model(path, device="cpu", trust_remote_code=trust_remote_code, allow_pickle=allow_pickle).model


def evaluate(path: str, *, baseline: str | None, config: EvalConfig, trust_remote_code: bool = False,
             allow_pickle: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Metrics under the stable keys of CLI.md: ppl, baseline_ppl, ppl_increase, kl, top1 or cosine."""
    check_source(config.dataset)
    source = resolve_model_source(path)
    kind = model_kind(load_config(source, trust_remote_code=trust_remote_code))
    check_eval_applies(config, kind, has_baseline=baseline is not None)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    model = load_any(source, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, kernel=config.kernel)
    base = None
    if baseline is not None:
        base_source = resolve_model_source(baseline)
        base_kind = model_kind(load_config(base_source, trust_remote_code=trust_remote_code))
        if base_kind != kind:
            raise CompressError(f"baseline {baseline} is a {base_kind} model but {path} is a {kind} model")
        base = load_any(base_source, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                        kernel=config.kernel)
    metrics: dict[str, Any] = {"kind": kind, "dataset": config.dataset}
    if config.doc_separator is not None:  # only when set, so reports of default runs keep their bytes
        metrics["doc_separator"] = config.doc_separator
    if Path(source).is_dir():
        metrics["size_bytes"] = dir_size_bytes(Path(source))
        if baseline is not None and Path(resolve_model_source(baseline)).is_dir():
            metrics["baseline_size_bytes"] = dir_size_bytes(Path(resolve_model_source(baseline)))
            metrics["compression_ratio"] = metrics["baseline_size_bytes"] / max(metrics["size_bytes"], 1)
    with torch.inference_mode():
        if kind == "causal-lm":
            seq_len = config.seq_len or min(2048, context_length(model.config))
            windows = eval_windows(tokenizer, config.dataset, seq_len, max_windows=config.max_windows,
                                   doc_separator=config.doc_separator)
            metrics.update({"seq_len": seq_len, "windows": int(windows.shape[0])})
            if base is None:
                scores = perplexity(model, windows, progress=progress)
                metrics.update({"ppl": scores.ppl, "tokens": scores.tokens})
            else:
                compared = compare_lm(model, base, windows, progress=progress)
                metrics.update({"ppl": compared.ppl, "baseline_ppl": compared.baseline_ppl,
                                "ppl_increase": compared.ppl_increase, "kl": compared.kl,
                                "top1": compared.top1, "tokens": compared.tokens})
        elif base is not None:
            limit = config.max_windows or _MAX_TEXTS
            texts = [t for t in load_texts(config.dataset, config.doc_separator) if t.strip()][:limit]
            scores = compare_embeddings(model, base, tokenizer, texts)
            metrics.update({"cosine": scores.cosine, "cosine_min": scores.cosine_min,
                            "spearman": scores.spearman, "texts": scores.texts})
    return metrics


def check_eval_applies(config: EvalConfig, kind: str, *, has_baseline: bool = True) -> None:
    """The gates and the eval text suit this kind of model (``causal-lm`` / ``encoder``, from its config)."""
    check_gates_apply(kind, max_ppl_increase=config.max_ppl_increase, min_cosine=config.min_cosine,
                      min_compression_ratio=config.min_compression_ratio, has_baseline=has_baseline)
    if kind == "encoder" and has_baseline and _one_document(config.dataset, config.doc_separator):
        raise CompressError(
            f"eval of an encoder compares the embeddings of separate texts, but eval dataset '{config.dataset}' "
            "is one .txt file, which is a single document unless eval.doc_separator (--doc-separator) splits it"
        )


def _one_document(dataset: str, doc_separator: str | None) -> bool:
    """A single plain-text file without a separator: one document (``compress.calibrate.data``)."""
    spec = check_source(dataset)
    path = Path(spec.path)
    return doc_separator is None and spec.kind == "local" and path.is_file() and path.suffix.lower() == ".txt"


def check_before_load(recipe) -> None:
    """Everything a run can refuse from the recipe, the dataset paths and the model's config alone, called
    by ``run`` and ``dry_run`` before any weights are read: missing or unsupported calibration / eval files,
    and gates or eval text the model's kind cannot use (model-independent conflicts are refused by the
    Recipe's own validation). Hub datasets cannot be checked offline and pass."""
    check_source(recipe.calibration.dataset)
    ev = recipe.eval
    if not ev.enabled:
        return
    check_source(ev.dataset)
    needs_kind = ev.max_ppl_increase is not None or ev.min_cosine is not None or _one_document(
        ev.dataset, ev.doc_separator)
    if needs_kind:
        kind = model_kind(load_config(recipe.model, trust_remote_code=recipe.trust_remote_code))
        check_eval_applies(ev, kind)


def context_length(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def evaluate_artifact(folder: Path, *, baseline: str, config: EvalConfig, recipe, progress=None) -> dict[str, Any]:
    """Eval of a freshly exported folder against the model it came from."""
    return evaluate(str(folder), baseline=baseline, config=config, trust_remote_code=recipe.trust_remote_code,
                    allow_pickle=recipe.allow_pickle, progress=progress)

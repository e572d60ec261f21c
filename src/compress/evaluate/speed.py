"""Speed of a checkpoint as a user runs it: load time, prefill and decode tokens/s, peak memory.

Prefill is one forward over ``batch x prompt_len`` tokens (median of a few after a warm-up). Decode is greedy
generation with the KV cache, timed as a manual loop of single-token forwards after the prefill, so the figure
is the per-token cost and not the prompt's. Token ids are random: speed does not depend on what they say.

Peak memory on the CPU is the process's resident-set high-water mark (``getrusage``): it counts the Python
process as a whole (interpreter, libraries, every model it has loaded), so it is reset before each model where
Linux allows it (``/proc/self/clear_refs``) and reported with that caveat. On CUDA it is
``torch.cuda.max_memory_allocated`` after a reset, i.e. tensors only.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from compress.core.errors import CompressError


@dataclass
class SpeedResult:
    path: str
    device: str
    load_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float | None
    peak_memory_bytes: int
    memory_kind: str
    model_bytes: int
    kernels: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reset_peak(device: torch.device) -> str:
    """Reset the high-water mark; returns what the peak figure measures."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as handle:  # Linux: "5" resets the peak RSS
            handle.write("5")
        return "process peak RSS (reset before this model)"
    except OSError:
        return "process peak RSS (cumulative: includes everything loaded earlier in this process)"


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load(path: str, device: str, kernel: str) -> torch.nn.Module:
    from compress.export.load import read_json
    from compress.models.load import load_model, resolve_model_source

    source = resolve_model_source(path)
    folder = Path(source)
    if folder.is_dir() and "quantization_config" in read_json(folder / "config.json", "config"):
        from compress.export.load import load

        return load(source, device=device, kernel=kernel)
    target = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    return load_model(source, device=target).model


def _warm_imports(path: str) -> None:
    """Import the architecture's modules before timing: load time is the checkpoint's, not Python's first import
    of transformers (seconds, paid once per process, which would otherwise land on whichever model goes first)."""
    import transformers

    import compress.export.load  # noqa: F401
    from compress.models.load import resolve_model_source

    try:
        config = transformers.AutoConfig.from_pretrained(resolve_model_source(path))
    except Exception:  # the timed load reports a bad checkpoint in its own words
        return
    for arch in getattr(config, "architectures", None) or []:
        getattr(transformers, arch, None)


def _model_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def _context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def measure(path: str, *, prompt_len: int = 128, new_tokens: int = 64, batch: int = 1, kernel: str = "auto",
            device: str = "auto", repeats: int = 3, seed: int = 0) -> SpeedResult:
    """Load ``path`` and time it. Everything happens in this process; call it once per model to compare."""
    if prompt_len < 1 or new_tokens < 0 or batch < 1 or repeats < 1:
        raise CompressError("--prompt-len, --batch and --repeats must be at least 1 and --new-tokens at least 0")
    gc.collect()
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    _warm_imports(path)
    memory_kind = _reset_peak(target)
    start = time.perf_counter()
    model = _load(path, device, kernel)
    _sync(target)
    load_s = time.perf_counter() - start
    model.eval()
    config = model.config
    context = _context_length(config)
    if context is not None and prompt_len + new_tokens > context:
        raise CompressError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceeds the model's context "
                            f"of {context} tokens")
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab <= 0:
        raise CompressError(f"{path} has no vocab_size in its config, so random prompts cannot be made")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(target)
    decoder = hasattr(model, "generate") and bool(getattr(config, "is_decoder", False) or
                                                  type(model).__name__.endswith("ForCausalLM"))
    with torch.inference_mode():
        prefill = _time_prefill(model, ids, target, repeats)
        decode = _time_decode(model, ids, new_tokens, target) if decoder and new_tokens > 0 else None
    result = SpeedResult(
        path=str(path), device=str(target), load_s=load_s, prefill_tokens_per_s=batch * prompt_len / prefill,
        decode_tokens_per_s=None if decode is None else batch * new_tokens / decode,
        peak_memory_bytes=_peak_bytes(target), memory_kind=memory_kind, model_bytes=_model_bytes(model),
        kernels=dict(getattr(model, "compress_kernels", None) or {}),
    )
    del model
    gc.collect()
    return result


def _time_prefill(model: torch.nn.Module, ids: torch.Tensor, device: torch.device, repeats: int) -> float:
    model(ids)  # warm-up: kernel selection, allocator, lazy repacking
    times = []
    for _ in range(repeats):
        _sync(device)
        tick = time.perf_counter()
        model(ids)
        _sync(device)
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def _time_decode(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """Seconds for ``new_tokens`` greedy steps with the KV cache (the prompt's prefill is not counted)."""
    _greedy(model, ids, min(2, new_tokens))  # warm-up of the single-token path
    out = model(ids, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    tick = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - tick


def _greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> None:
    out = model(ids, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)


def compare(model: SpeedResult, baseline: SpeedResult | None) -> dict[str, Any]:
    """The two results side by side with model/baseline ratios (>1: the model is faster / bigger)."""
    payload: dict[str, Any] = {"model": model.to_dict()}
    if baseline is None:
        return payload
    payload["baseline"] = baseline.to_dict()

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    payload["ratio"] = {
        "prefill_tokens_per_s": ratio(model.prefill_tokens_per_s, baseline.prefill_tokens_per_s),
        "decode_tokens_per_s": ratio(model.decode_tokens_per_s, baseline.decode_tokens_per_s),
        "peak_memory_bytes": ratio(model.peak_memory_bytes, baseline.peak_memory_bytes),
        "model_bytes": ratio(model.model_bytes, baseline.model_bytes),
        "load_s": ratio(model.load_s, baseline.load_s),
    }
    return payload

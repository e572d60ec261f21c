"""Low-rank compensation factors on disk: a PEFT LoRA adapter in the ``lowrank/`` subfolder of an export.

Layout (``lowrank/`` beside ``model.safetensors``)::

    lowrank/adapter_config.json        peft_type LORA, r, lora_alpha = r (scale 1), target_modules: exact names
    lowrank/adapter_model.safetensors  base_model.model.<layer>.lora_A.weight [r, in]
                                       base_model.model.<layer>.lora_B.weight [out, r]   (the model's dtype)

Why a separate adapter and not extra tensors in the model's shards: the main checkpoint stays exactly what
the released readers load (transformers + compressed-tensors, vLLM, GPTQModel: vLLM refuses tensors it has
no parameter for), with or without the compensation. Why a subfolder: transformers treats a model folder
holding ``adapter_config.json`` as an adapter and loads ``base_model_name_or_path`` instead of the folder's
own weights; in ``lowrank/`` it is invisible to ``from_pretrained(folder)``, and
``PeftModel.from_pretrained(model, folder + "/lowrank")`` attaches it (PEFT's names, ``r == lora_alpha``).
``compress.load`` applies it to the rebuilt ``QuantLinear`` layers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from compress.core.errors import CompressError
from compress.kernels.quant_linear import LOWRANK_LEAVES, QuantLinear

ADAPTER_DIR = "lowrank"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_FLOATS = {torch.float16, torch.bfloat16, torch.float32}


def lowrank_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """Quantized layers carrying compensation factors, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear) and m.lowrank_rank is not None}


def is_lowrank_key(name: str) -> bool:
    """Whether a state-dict name is a compensation factor (``P.lora_A`` / ``P.lora_B``), kept out of the shards."""
    return name.rpartition(".")[2] in LOWRANK_LEAVES


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named factor tensors of every compensated layer (CPU, contiguous)."""
    tensors = {}
    for name, module in lowrank_modules(model).items():
        assert module.lora_A is not None and module.lora_B is not None
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().to("cpu").contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().to("cpu").contiguous()
    return tensors


def adapter_config(ranks: Mapping[str, int]) -> dict:
    """PEFT's ``LoraConfig`` of the factors: one rank (``r``; per-layer ranks in ``rank_pattern`` when they
    differ), ``lora_alpha`` equal to it so PEFT's scale ``alpha / r`` is 1, no dropout, no bias."""
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {name: r for name, r in ranks.items() if r != rank}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "inference_mode": True,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(ranks), "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None,
    }


def write_adapter(model: nn.Module, out_dir: Path) -> list[Path]:
    """``lowrank/`` with the adapter of ``model``'s compensated layers; nothing when there are none."""
    from compress.export.checkpoint import _save  # the exporter's file mode and fixed metadata

    modules = lowrank_modules(model)
    if not modules:
        return []
    folder = out_dir / ADAPTER_DIR
    folder.mkdir(exist_ok=True)
    weights = folder / ADAPTER_WEIGHTS
    _save(dict(sorted(adapter_tensors(model).items())), weights, {"format": "pt"})
    config = folder / ADAPTER_CONFIG
    ranks = {name: int(m.lowrank_rank or 0) for name, m in modules.items()}
    config.write_text(json.dumps(adapter_config(ranks), indent=2, sort_keys=True) + "\n")
    return [config, weights]


def adapter_header_meta(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """``{tensor name: (dtype, shape)}`` of the adapter's file (headers only); empty without an adapter."""
    path = folder / ADAPTER_DIR / ADAPTER_WEIGHTS
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {n: (handle.get_slice(n).get_dtype(), list(handle.get_slice(n).get_shape())) for n in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CompressError(f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS} in {folder} is corrupt ({error})") from None


def read_adapter(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """Layer name → ``(A, B)`` as scaled for the forward (``alpha / r`` folded into ``B``), validated; None when
    ``folder`` has no ``lowrank/`` adapter."""
    root = folder / ADAPTER_DIR
    if not root.exists():
        return None
    from compress.export.load import read_json

    config = read_json(root / ADAPTER_CONFIG, "adapter config")
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("bias", "none") != "none":
        raise CompressError(f"{ADAPTER_DIR}/{ADAPTER_CONFIG} in {folder} is not a plain LoRA adapter")
    if not (root / ADAPTER_WEIGHTS).is_file():
        raise CompressError(f"{folder} has {ADAPTER_DIR}/{ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    try:
        with safe_open(str(root / ADAPTER_WEIGHTS), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CompressError(f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS} in {folder} is corrupt or truncated ({error})") from None
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        body = key.removeprefix(PEFT_PREFIX)
        for leaf in LOWRANK_LEAVES:
            suffix = f".{leaf}.weight"
            if key.startswith(PEFT_PREFIX) and body.endswith(suffix):
                factors.setdefault(body[: -len(suffix)], {})[leaf] = tensor
                break
        else:
            raise CompressError(f"tensor {key} in {ADAPTER_DIR}/{ADAPTER_WEIGHTS} is not a LoRA factor")
    result = {}
    for name, pair in factors.items():
        if set(pair) != set(LOWRANK_LEAVES):
            raise CompressError(f"the adapter in {folder} holds only one factor of layer {name}")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dtype not in _FLOATS or b.dtype not in _FLOATS or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise CompressError(f"the adapter factors of layer {name} in {folder} have shapes {list(a.shape)} and "
                                f"{list(b.shape)} ({a.dtype}, {b.dtype}); expected float [r, in] and [out, r]")
        rank = a.shape[0]
        alpha = _number(config.get("alpha_pattern", {}).get(name, config.get("lora_alpha", rank)))
        r = _number(config.get("rank_pattern", {}).get(name, config.get("r", rank)))
        if r != rank:
            raise CompressError(f"the adapter in {folder} says rank {r} for layer {name} but stores rank {rank}")
        scale = 1.0 if alpha == rank else alpha / rank
        result[name] = (a, b if scale == 1.0 else (b.float() * scale).to(b.dtype))
    return result


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CompressError(f"the adapter config holds an invalid rank or alpha {value!r}")
    return value


def apply_adapter(model: nn.Module, folder: Path) -> int:
    """Attach ``folder``'s adapter factors to ``model``'s quantized layers; returns how many layers."""
    factors = read_adapter(folder)
    if not factors:
        return 0
    for name, (a, b) in sorted(factors.items()):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CompressError(f"the adapter in {folder} targets {name}, which the model does not have") from None
        if not isinstance(module, QuantLinear):
            raise CompressError(f"the adapter in {folder} targets {name}, which is not a quantized layer")
        module.set_lowrank(a, b)
    return len(factors)

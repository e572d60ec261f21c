"""``compress.load``: a compressed checkpoint back as a runnable transformers model.

The architecture is built from ``config.json`` without initialising weights; every codec is asked which
layers it stores (``compress.codecs.layer_plan``) and rebuilds them: quantized layers become a
``QuantLinear`` holding the codes in their layout (never a dequantized copy), dense-value layouts (bitmask
sparsity) are decoded into the architecture's own layer; then the safetensors shards are loaded. Every
tensor is validated against the config before it is trusted: a checkpoint that disagrees with itself is a
``CompressError`` naming the tensor and file. A ``lowrank/`` PEFT adapter (low-rank error compensation,
``compress.export.adapter``) is applied to the quantized layers it targets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from compress.codecs import StoredLayer, check_quant_config, layer_plan, scheme_for
from compress.core.errors import CompressError
from compress.core.records import LayerRecord, LayerRecords
from compress.core.targets import matches_any
from compress.export.adapter import apply_adapter
from compress.kernels.kv_cache import SCALE_NAMES as KV_SCALE_NAMES
from compress.kernels.kv_cache import attention_modules, install_kv_quantizer, read_kv_cache_scheme
from compress.kernels.llm_int8 import CONFIG_KEY as LLM_INT8_KEY
from compress.kernels.llm_int8 import DEFAULT_THRESHOLD, check_threshold, is_llm_int8_scheme
from compress.kernels.paths import apply_kernel, requested_kernel
from compress.kernels.quant_linear import QuantLinear
from compress.models.blocks import convert_conv1d_to_linear
from compress.models.safety import check_checkpoint_folder

__all__ = ["build_empty_model", "checkpoint_records", "load", "read_json", "read_tensors", "scheme_for",
           "weight_files"]

CHECKPOINT_METHOD = "checkpoint"
"""The origin a loaded layer's record names: what produced it is not in a checkpoint, only what it is."""


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompressError(f"{path.parent} has no {path.name}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CompressError(f"{what} {path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise CompressError(f"{what} {path} must hold a JSON object")
    return data


def weight_files(path: Path) -> list[Path]:
    """The shard files of a checkpoint, validated before any tensor is read: index entries must be plain
    file names inside the folder, and every safetensors header must be consistent (``models.safety``)."""
    files = check_checkpoint_folder(path)
    if not files:
        raise CompressError(f"{path} has no .safetensors weights")
    return files


def read_tensors(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of the shards, plus which file each came from (for error messages)."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if name in tensors:
                        raise CompressError(f"tensor {name} appears in both {origin[name]} and {file.name}")
                    tensors[name] = handle.get_tensor(name)
                    origin[name] = file.name
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise CompressError(f"weights file {file.name} is corrupt or truncated ({_short(error)})") from None
    return tensors, origin


def _short(error: Exception) -> str:
    return str(error).splitlines()[0][:160] if str(error) else type(error).__name__


def _architecture_class(config):
    import transformers

    for arch in config.architectures or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from compress.models.load import model_kind

    auto = transformers.AutoModelForCausalLM if model_kind(config) == "causal-lm" else transformers.AutoModel
    return auto


def build_empty_model(config) -> nn.Module:
    """The architecture with weights left uninitialised (they are all overwritten by the checkpoint)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    cls = _architecture_class(config)
    with no_init_weights():
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    return model.eval()


def _swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def load(path: str | Path, device: str = "auto", kernel: str = "auto", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a compressed checkpoint (or a plain safetensors model) as a runnable transformers model."""
    from transformers import AutoConfig

    folder = Path(path)
    if not folder.exists():
        raise CompressError(f"checkpoint {folder} does not exist")
    if not folder.is_dir():
        raise CompressError(f"checkpoint {folder} is a file; expected a folder with config.json")
    config_data = read_json(folder / "config.json", "config")
    quant_config = config_data.get("quantization_config")
    files = weight_files(folder)  # index and headers checked before transformers or safetensors read anything
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as error:  # transformers raises many types for a bad config
        raise CompressError(f"config.json in {folder} cannot be read by transformers ({_short(error)})") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tensors, origin = read_tensors(files)

    requested_kernel(kernel)  # an unknown name fails before any weight is read
    try:
        model = build_empty_model(config)
    except Exception as error:  # a config transformers parses but cannot build (sizes that do not divide, ...)
        raise CompressError(f"config.json in {folder} describes a model transformers cannot build "
                            f"({_short(error)})") from None
    converted = set(convert_conv1d_to_linear(model))
    plan = layer_plan(tensors, quant_config, source=str(folder))
    _check_model_level(plan, quant_config)
    rebuilt = set()
    for layer in plan:
        original = _target_linear(model, layer, origin)
        file = origin.get(f"{layer.name}.{layer.codec.marker}", "?")
        try:
            if not layer.codec.quantized:  # dense values: back under P.weight, for the architecture's own layer
                tensors[f"{layer.name}.weight"] = layer.codec.decode(layer.name, tensors, None)
                origin[f"{layer.name}.weight"] = file
                for key in layer.codec.parts(layer.name, tensors):
                    tensors.pop(key)
                continue
            module = layer.codec.rebuild(layer.name, tensors, layer.scheme, tensors.get(f"{layer.name}.bias"),
                                         **layer.options)
        except CompressError as error:
            raise CompressError(f"{str(error).rstrip('.')} (in {file})") from None
        _check_rebuilt(layer.name, module, original, file)
        for key in layer.codec.parts(layer.name, tensors):  # the module holds them now, under its own names
            tensors.pop(key)
        tensors.update({f"{layer.name}.{k}": v for k, v in module.state_dict().items()})
        _swap_module(model, layer.name, module)
        rebuilt.add(layer.name)
    for name in converted - rebuilt:  # dense layers keep the checkpoint's Conv1D layout
        key = f"{name}.weight"
        if key in tensors:
            tensors[key] = tensors[key].t().contiguous()

    _install_kv_cache(model, quant_config, tensors, origin, folder)
    _load_state(model, tensors, origin, folder)
    _apply_llm_int8(model, quant_config, folder)
    apply_adapter(model, folder)  # low-rank compensation factors (lowrank/), when the export has them
    target_device = _resolve_device(device)
    if dtype is not None:
        for module in model.modules():
            if not isinstance(module, QuantLinear):
                for param in module.parameters(recurse=False):
                    param.data = param.data.to(dtype)
    model.to(target_device)
    model.compress_kernels = apply_kernel(model, kernel)
    return model


def checkpoint_records(model: nn.Module, quant_config) -> LayerRecords:
    """The layer records of a model ``load`` built, from its checkpoint's ``quantization_config``, so it can be
    re-exported (``export.checkpoint.quantization_config(model, names, records=...)``) with the config it
    was read from: each quantized layer's scheme and layout as rebuilt, the observer and activation order
    its config group names (kept in the scheme's weight args on load), and the pattern of the pruned layers
    ``sparsity_config`` targets. Their origin is ``checkpoint``."""
    sparsity = quant_config.get("sparsity_config") if isinstance(quant_config, dict) else None
    targets = sparsity.get("targets") if isinstance(sparsity, dict) else None
    targets = [t for t in targets if isinstance(t, str)] if isinstance(targets, list) else []
    structure = sparsity.get("sparsity_structure") if isinstance(sparsity, dict) else None
    records = []
    for name, module in model.named_modules():
        pattern = str(structure or "unstructured") if targets and matches_any(name, targets) else None
        if isinstance(module, QuantLinear):
            weights = module.scheme.weights
            records.append(LayerRecord(name, (CHECKPOINT_METHOD,), (module.scheme.tag,), module.in_features,
                                       module.out_features, scheme=module.scheme, format=module.format,
                                       observer=None if weights is None else weights.observer or "minmax",
                                       actorder=None if weights is None else weights.actorder, sparsity=pattern))
        elif isinstance(module, nn.Linear) and pattern is not None:
            records.append(LayerRecord(name, (CHECKPOINT_METHOD,), ("dense",), module.in_features,
                                       module.out_features, sparsity=pattern))
    return LayerRecords(records)


def _check_model_level(plan: list[StoredLayer], quant_config) -> None:
    """A model-level method (GPTQ) whose config promises layers the tensors do not hold is refused."""
    if isinstance(quant_config, dict) and quant_config.get("quant_method") not in (None, "compressed-tensors") \
            and not any(layer.codec.quant_method == quant_config["quant_method"] for layer in plan):
        method = quant_config["quant_method"]
        raise CompressError(f"quantization_config says {method} but the checkpoint has no tensors in that layout")


def _target_linear(model: nn.Module, layer: StoredLayer, origin: dict[str, str]) -> nn.Linear:
    """The architecture's Linear that a stored layer replaces (or fills)."""
    marker = f"{layer.name}.{layer.codec.marker}"
    try:
        original = model.get_submodule(layer.name)
    except AttributeError:
        raise CompressError(f"tensor {marker} in {origin.get(marker, '?')} names a layer the architecture does "
                            "not have") from None
    if not isinstance(original, nn.Linear):
        raise CompressError(f"tensor {marker} targets {layer.name}, which is not a linear layer")
    return original


def _check_rebuilt(name: str, module: nn.Module, original: nn.Linear, file: str) -> None:
    """The rebuilt layer has the architecture's shape and bias presence."""
    shape = (module.out_features, module.in_features)
    if shape != (original.out_features, original.in_features):
        raise CompressError(f"layer {name} in {file} is stored as {shape[0]}x{shape[1]}, "
                            f"but the config implies {original.out_features}x{original.in_features}")
    if (getattr(module, "bias", None) is None) != (original.bias is None):
        raise CompressError(f"layer {name} in {file}: bias presence disagrees with the architecture")


def _check_quant_config(quant_config) -> None:
    """Kept for callers that validate a config without reading tensors (``convert``)."""
    check_quant_config(quant_config)


def _install_kv_cache(model: nn.Module, quant_config: Any, tensors: dict[str, torch.Tensor], origin: dict[str, str],
                      folder: Path) -> None:
    """A ``kv_cache_scheme`` (FP8 static scales) becomes each attention's KV-cache quantizer, its
    ``k_scale`` / ``v_scale`` taken out of ``tensors`` (``kernels/kv_cache.py``)."""
    block = quant_config.get("kv_cache_scheme") if isinstance(quant_config, dict) else None
    if block is None:
        stray = next((k for k in tensors if k.rpartition(".")[2] in KV_SCALE_NAMES), None)
        if stray is not None:
            raise CompressError(f"tensor {stray} in {origin.get(stray, '?')} is a KV-cache scale, but config.json "
                                "has no kv_cache_scheme saying how to use it")
        return
    strategy = read_kv_cache_scheme(block)
    attentions = attention_modules(model)
    if not attentions:
        raise CompressError(f"config.json in {folder} has a kv_cache_scheme, but this architecture has no attention "
                            "module with a KV cache to quantize")
    for name, module in attentions.items():
        keys = [f"{name}.{leaf}" for leaf in KV_SCALE_NAMES]
        missing = [key for key in keys if key not in tensors]
        if missing:
            raise CompressError(f"checkpoint {folder} has a kv_cache_scheme but lacks tensor {missing[0]}")
        k_scale, v_scale = (tensors.pop(key) for key in keys)
        try:
            install_kv_quantizer(module, strategy, k_scale, v_scale)
        except CompressError as error:
            raise CompressError(f"{name}: {error} (in {origin.get(keys[0], '?')})") from None


def _apply_llm_int8(model: nn.Module, quant_config: Any, folder: Path) -> None:
    """``quantization_config.llm_int8``: its target layers run LLM.int8()'s outlier decomposition; they must
    be int8 symmetric per-channel weight-only layers (the weights LLM.int8 multiplies)."""
    block = quant_config.get(LLM_INT8_KEY) if isinstance(quant_config, dict) else None
    if block is None:
        return
    targets = block.get("targets") if isinstance(block, dict) else None
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise CompressError(f"quantization_config.{LLM_INT8_KEY} in {folder} must name its target layers in a "
                            "non-empty list")
    try:
        threshold = check_threshold(block.get("threshold", DEFAULT_THRESHOLD))
    except (TypeError, ValueError):
        raise CompressError(f"quantization_config.{LLM_INT8_KEY}.threshold in {folder} is not a number") from None
    for name in targets:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise CompressError(f"quantization_config.{LLM_INT8_KEY} names layer {name}, which the architecture "
                                "does not have") from None
        if not isinstance(layer, QuantLinear) or not is_llm_int8_scheme(layer.scheme):
            what = layer.scheme.tag if isinstance(layer, QuantLinear) else "dense"
            raise CompressError(f"quantization_config.{LLM_INT8_KEY} targets {name}, which is {what}; LLM.int8() "
                                "runs on int8 symmetric per-channel weight-only layers")
        layer.outlier_threshold = threshold


def _load_state(model: nn.Module, tensors: dict[str, torch.Tensor], origin: dict[str, str], folder: Path) -> None:
    expected = model.state_dict()
    for name, tensor in tensors.items():
        if name not in expected:
            raise CompressError(f"tensor {name} in {origin.get(name, '?')} does not belong to this architecture")
        want = expected[name]
        if tuple(want.shape) != tuple(tensor.shape):
            raise CompressError(f"tensor {name} in {origin.get(name, '?')} has shape {list(tensor.shape)}, "
                                f"but the config implies {list(want.shape)}")
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    tied = _tied_names(model)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise CompressError(f"checkpoint {folder} lacks tensor {missing[0]}"
                            + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))


def _tied_names(model: nn.Module) -> set[str]:
    """Names whose parameter is shared with another name (filled by tying, not by the checkpoint)."""
    owners: dict[int, str] = {}
    tied: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        key = id(param)
        if key in owners:
            tied.add(name)
            tied.add(owners[key])
        else:
            owners[key] = name
    return tied


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CompressError("--device cuda was asked for but no CUDA device is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise CompressError(f"unknown device {device!r}; use auto, cpu or cuda") from None

"""``compress.load``: a compressed checkpoint back as a runnable transformers model.

The architecture is built from ``config.json`` without initialising weights, every layer that has a
``weight_packed`` tensor becomes a ``QuantLinear`` holding the packed codes (never a dequantized copy),
and the safetensors shards are loaded into it. Every tensor is validated against the config before it
is trusted: a checkpoint that disagrees with itself is a ``CompressError`` naming the tensor and file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from compress.core.errors import CompressError
from compress.core.packing import PackedWeight
from compress.core.scheme import QuantScheme
from compress.core.sparsity import BITMASK_SUFFIXES, from_bitmask
from compress.core.targets import matches
from compress.kernels.paths import apply_kernel, requested_kernel
from compress.kernels.quant_linear import QuantLinear
from compress.models.blocks import convert_conv1d_to_linear
from compress.models.safety import check_checkpoint_folder

_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")


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


def scheme_for(name: str, quant_config: dict) -> tuple[QuantScheme, dict]:
    """The config group whose targets claim layer ``name``."""
    groups = quant_config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CompressError("quantization_config has no config_groups")
    fallback = None
    for group in groups.values():
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            raise CompressError("quantization_config has a config group without a weights scheme")
        targets = group.get("targets") or []
        if any(t != "Linear" and matches(name, t) for t in targets):
            return QuantScheme.from_compressed_tensors(group["weights"]), group["weights"]
        if "Linear" in targets and fallback is None:
            fallback = group["weights"]
    if fallback is None:
        raise CompressError(f"layer {name} has packed weights but no config group targets it")
    return QuantScheme.from_compressed_tensors(fallback), fallback


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
    if quant_config is None and any(n.endswith((".weight_packed", ".qweight")) for n in tensors):
        raise CompressError(f"{folder} holds packed weights but config.json has no quantization_config")
    if quant_config is not None:
        tensors, quant_config = _from_gptq_if_needed(tensors, origin, quant_config)
        _check_quant_config(quant_config)
    tensors = _densify_bitmasks(tensors, origin)
    packed_names = sorted(n[: -len(".weight_packed")] for n in tensors if n.endswith(".weight_packed"))
    for name in packed_names:
        try:
            original = model.get_submodule(name)
        except AttributeError:
            raise CompressError(f"tensor {name}.weight_packed in {origin[name + '.weight_packed']} names a layer "
                                "the architecture does not have") from None
        if not isinstance(original, nn.Linear):
            raise CompressError(f"tensor {name}.weight_packed targets {name}, which is not a linear layer")
        scheme, _ = scheme_for(name, quant_config)
        _swap_module(model, name, _quant_layer(name, scheme, tensors, origin, original))
    dense_conv1d = converted - set(packed_names)
    for name in dense_conv1d:  # dense layers keep the checkpoint's Conv1D layout
        key = f"{name}.weight"
        if key in tensors:
            tensors[key] = tensors[key].t().contiguous()

    _load_state(model, tensors, origin, folder)
    target_device = _resolve_device(device)
    if dtype is not None:
        for module in model.modules():
            if not isinstance(module, QuantLinear):
                for param in module.parameters(recurse=False):
                    param.data = param.data.to(dtype)
    model.to(target_device)
    model.compress_kernels = apply_kernel(model, kernel)
    return model


def _quant_layer(name: str, scheme: QuantScheme, tensors: dict[str, torch.Tensor], origin: dict[str, str],
                 original: nn.Linear) -> QuantLinear:
    """Validate one layer's packed tensors and take them out of ``tensors`` into a ``QuantLinear``."""
    file = origin.get(f"{name}.weight_packed", "?")
    try:
        packed = PackedWeight.from_tensors(name, tensors, scheme)
    except CompressError as error:
        raise CompressError(f"{str(error).rstrip('.')} (in {file})") from None
    if (packed.out_features, packed.in_features) != (original.out_features, original.in_features):
        raise CompressError(f"tensor {name}.weight_shape in {file} says {packed.out_features}x{packed.in_features}, "
                            f"but the config implies {original.out_features}x{original.in_features}")
    bias = tensors.get(f"{name}.bias")
    if (bias is None) != (original.bias is None):
        raise CompressError(f"layer {name} in {file}: bias presence disagrees with the architecture")
    return QuantLinear.from_packed(packed, bias)


def _from_gptq_if_needed(tensors: dict[str, torch.Tensor], origin: dict[str, str],
                         quant_config) -> tuple[dict[str, torch.Tensor], dict]:
    """A GPTQ-layout checkpoint is re-arranged in memory into the compressed-tensors tensors (same codes)."""
    if not isinstance(quant_config, dict) or quant_config.get("quant_method") != "gptq":
        return tensors, quant_config
    from compress.export.gptq import compressed_tensors_config, from_gptq

    converted, schemes = from_gptq(tensors, quant_config, origin)
    if not schemes:
        raise CompressError("quantization_config says gptq but the checkpoint has no qweight tensors")
    has_g_idx = any(n.endswith(".weight_g_idx") for n in converted)
    return converted, compressed_tensors_config(schemes, has_g_idx, ignore=())


def _check_quant_config(quant_config) -> None:
    if not isinstance(quant_config, dict):
        raise CompressError("quantization_config in config.json must be an object")
    method = quant_config.get("quant_method")
    if method != "compressed-tensors":
        raise CompressError(f"quantization_config.quant_method {method!r} is not supported "
                            "(expected compressed-tensors or gptq)")
    fmt = quant_config.get("format")
    if fmt not in ("pack-quantized", "dense"):
        raise CompressError(f"compressed-tensors format {fmt!r} is not supported yet (expected pack-quantized "
                            "or dense)")
    sparsity = quant_config.get("sparsity_config") or {}
    if not isinstance(sparsity, dict) or sparsity.get("format", "dense") not in ("dense", "sparse-bitmask"):
        raise CompressError("quantization_config.sparsity_config must be empty or use the dense or "
                            "sparse-bitmask format")


def _densify_bitmasks(tensors: dict[str, torch.Tensor], origin: dict[str, str]) -> dict[str, torch.Tensor]:
    """``P.{shape,compressed,bitmask,row_offsets}`` (sparse-bitmask) → the dense ``P.weight`` with its zeros."""
    prefixes = sorted(n[: -len(".bitmask")] for n in tensors if n.endswith(".bitmask"))
    for prefix in prefixes:
        parts = {}
        for suffix in BITMASK_SUFFIXES:
            parts[suffix] = tensors.pop(f"{prefix}.{suffix}", None)
        file = origin.get(f"{prefix}.bitmask", "?")
        try:
            dense = from_bitmask({k: v for k, v in parts.items() if v is not None}, prefix)
        except CompressError as error:
            raise CompressError(f"{str(error).rstrip('.')} (in {file})") from None
        tensors[f"{prefix}.weight"] = dense
        origin[f"{prefix}.weight"] = file
    return tensors


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

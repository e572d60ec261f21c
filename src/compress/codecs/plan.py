"""Which layers of a checkpoint are stored how: every codec is asked which layers it holds, and the
quantization config says which scheme (and, for compressed-tensors, which format) each one has.

``layer_plan`` needs tensor names only, so the loader (tensors in memory), ``inspect`` (headers) and
``convert`` share it. Every refusal is one sentence: a layer no config group targets, a format no codec
registers, a scheme a codec cannot serve (e.g. dynamic activations), a config that contradicts the tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from compress.codecs.base import CODECS, Codec, all_codecs
from compress.core.errors import CompressError
from compress.core.scheme import QuantScheme
from compress.core.targets import matches

GENERIC_FORMATS = ("dense", "mixed-precision")
"""Top-level ``format`` values that name no layout themselves (the groups', or the tensors', decide)."""


@dataclass(frozen=True)
class StoredLayer:
    """One layer of a checkpoint: where it is, which codec holds it, with which scheme."""

    name: str
    codec: Codec
    scheme: QuantScheme | None
    options: Mapping[str, Any] = field(default_factory=dict)


def compressed_tensors_formats() -> list[str]:
    return [c.name for c in all_codecs() if c.quant_method == "compressed-tensors"]


def check_quant_config(quant_config: Any) -> None:
    """A ``quantization_config`` some registered codec reads; CompressError otherwise."""
    if not isinstance(quant_config, dict):
        raise CompressError("quantization_config in config.json must be an object")
    method = quant_config.get("quant_method")
    methods = sorted({c.quant_method for c in all_codecs() if c.quant_method is not None})
    if method not in methods:
        raise CompressError(f"quantization_config.quant_method {method!r} is not supported "
                            f"(expected {' or '.join(methods)})")
    if method != "compressed-tensors":
        return
    known = compressed_tensors_formats()
    fmt = quant_config.get("format")
    if fmt not in (*known, *GENERIC_FORMATS):
        raise CompressError(f"compressed-tensors format {fmt!r} is not supported yet (expected "
                            f"{', '.join(known)}, {' or '.join(GENERIC_FORMATS)})")
    sparsity = quant_config.get("sparsity_config") or {}
    sparse = ["dense", *(c.name for c in all_codecs() if not c.quantized)]
    if not isinstance(sparsity, dict) or sparsity.get("format", "dense") not in sparse:
        raise CompressError(f"quantization_config.sparsity_config must be empty or use the {', '.join(sparse[:-1])} "
                            f"or {sparse[-1]} format")


def config_group_for(name: str, quant_config: Mapping[str, Any]) -> dict[str, Any]:
    """The config group whose targets claim layer ``name`` (an exact or ``re:`` target before ``Linear``)."""
    groups = quant_config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CompressError("quantization_config has no config_groups")
    fallback = None
    for group in groups.values():
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            raise CompressError("quantization_config has a config group without a weights scheme")
        targets = group.get("targets") or []
        if not isinstance(targets, list):
            raise CompressError("quantization_config has a config group whose targets are not a list")
        if any(isinstance(t, str) and t != "Linear" and matches(name, t) for t in targets):
            return group
        if "Linear" in targets and fallback is None:
            fallback = group
    if fallback is None:
        raise CompressError(f"layer {name} has packed weights but no config group targets it")
    return fallback


def scheme_for(name: str, quant_config: Mapping[str, Any]) -> tuple[QuantScheme, dict]:
    """(scheme, weights dict) of the config group that targets layer ``name``."""
    group = config_group_for(name, quant_config)
    return QuantScheme.from_config_group(group), group["weights"]


def layer_plan(names: Iterable[str], quant_config: Any, source: str = "the checkpoint") -> list[StoredLayer]:
    """Every stored (quantized or sparse) layer, by name. ``quant_config`` None: only dense-value layouts
    (sparsity) are allowed; quantized tensors without a config are refused (``source`` names the folder)."""
    names = set(names)
    claimed: dict[str, list[Codec]] = {}
    for codec in all_codecs():
        for prefix in codec.layers(names):
            claimed.setdefault(prefix, []).append(codec)
    quantized = {p for p, codecs in claimed.items() if any(c.quantized for c in codecs)}
    if quant_config is None and quantized:
        raise CompressError(f"{source} holds packed weights but config.json has no quantization_config")
    if quant_config is not None:
        check_quant_config(quant_config)
    method = None if quant_config is None else quant_config.get("quant_method")
    model_level: tuple[QuantScheme, dict[str, Any]] | None = None
    plan = []
    for prefix in sorted(claimed):
        candidates = claimed[prefix]
        sparse = [c for c in candidates if not c.quantized]
        if sparse:
            plan.append(StoredLayer(prefix, sparse[0], None))
            continue
        own = [c for c in candidates if c.quant_method == method]
        if not own:
            continue  # another method's tensors (e.g. a qweight in a compressed-tensors model): the loader refuses
        if method != "compressed-tensors":
            if model_level is None:
                model_level = own[0].read_config(quant_config)
            plan.append(StoredLayer(prefix, own[0], *model_level))
            continue
        group = config_group_for(prefix, quant_config)
        scheme = QuantScheme.from_config_group(group)
        plan.append(StoredLayer(prefix, _ct_codec(prefix, own, scheme, group.get("format") or quant_config["format"]),
                                scheme))
    return plan


def _ct_codec(prefix: str, candidates: list[Codec], scheme: QuantScheme, fmt: Any) -> Codec:
    """The compressed-tensors codec of one layer: the format its group (or the model) names, checked against
    the layouts its tensors fit; a generic format picks the first candidate that serves the scheme."""
    if fmt in GENERIC_FORMATS or fmt is None:
        for codec in candidates:
            if codec.unsupported(scheme) is None:
                return codec
        candidates[0].check(scheme, f"layer {prefix}: ")
    if fmt not in CODECS:
        raise CompressError(f"layer {prefix}: compressed-tensors format {fmt!r} is not supported yet (expected "
                            f"{', '.join(compressed_tensors_formats())})")
    codec = CODECS.get(fmt)
    if codec not in candidates:
        held = " or ".join(c.name for c in candidates)
        raise CompressError(f"layer {prefix} is stored as {held} but its config says format {fmt}")
    codec.check(scheme, f"layer {prefix}: ")
    return codec

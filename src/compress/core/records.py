"""Typed per-layer records: what the stages did to each layer, carried beside the model instead of on it.

A ``LayerRecord`` says how one layer came to be what it is: the stages that touched it (``methods``, with
each stage's short tag), its weight scheme (``QuantScheme``, None while dense), the codec layout holding it,
how its scales were chosen (``observer``, ``actorder``), its sparsity pattern and the weight error of the
last stage that measured one. The sweep writes one record per layer per stage (``Records`` in
``compress.pipeline.engine``, the history); ``LayerRecords`` folds that history into one record per layer,
and the export, the manifest, the model card and ``--resume`` read those records.

Why records and not module attributes: an attribute set with ``setattr`` is untyped, silently lost when a
later stage swaps the module, and invisible to anything holding only the checkpoint. A record is built
from the pass's config (``Pass.record_facts``) and the module the pass returned, merged by one rule
(``LayerRecord.then``), and saved and read back losslessly (``to_dict`` / ``from_dict``).

Why a frozen dataclass and not pydantic: ``core`` imports only the standard library and torch (DESIGN:
layer rules), records are built by code rather than parsed from user input, and ``from_dict`` validates
the few fields that could be wrong in a saved state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from compress.core.errors import CompressError
from compress.core.qargs import ACTORDERS, QuantArgs
from compress.core.scheme import QuantScheme

FACT_FIELDS = ("observer", "actorder", "sparsity", "lowrank")
"""What a pass may state about a layer it produced (``Pass.record_facts``), beyond what the module says."""


@dataclass(frozen=True)
class LayerRecord:
    """One layer as the stages left it (or, in the sweep's history, as one stage left it)."""

    name: str
    """Full module name (``model.layers.0.mlp.down_proj``)."""
    methods: tuple[str, ...]
    """Origin: the stage methods that produced the layer's current form, in order (``("sparsegpt", "gptq")``)."""
    tags: tuple[str, ...]
    """Each of those stages' short description (``Pass.describe``: ``sparsegpt-2of4``, ``w4g128``)."""
    in_features: int
    out_features: int
    scheme: QuantScheme | None = None
    """The weight (and input activation) quantization of the stored layer; None for a dense layer."""
    format: str | None = None
    """The codec layout holding the quantized layer (``pack-quantized``, ...); None for a dense layer."""
    observer: str | None = None
    """How the scales were chosen (``minmax``, ``mse``); None for a dense layer."""
    actorder: str | None = None
    """compressed-tensors ``actorder``: ``weight`` when columns were solved in activation order with
    contiguous groups (GPTQ ``act_order``), else None."""
    sparsity: str | None = None
    """Pruning pattern: ``unstructured``, ``2:4``, ...; None for a layer no stage pruned."""
    rel_weight_error: float | None = None
    """``‖Ŵ - W‖ / ‖W‖`` of the last stage that quantized the layer, against the weight it was given."""
    lowrank: int | None = None
    """Rank of the low-rank error compensation the layer carries (``lowrank`` stage); None without one."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "tags", tuple(self.tags))
        if not self.methods or len(self.tags) != len(self.methods):
            raise CompressError(f"the record of layer {self.name} needs one tag per method, got {self.methods} "
                                f"and {self.tags}")
        if self.actorder not in ACTORDERS:
            raise CompressError(f"the record of layer {self.name} has an unknown actorder {self.actorder!r}")
        if self.lowrank is not None and (not isinstance(self.lowrank, int) or self.lowrank <= 0):
            raise CompressError(f"the record of layer {self.name} has an invalid low-rank rank {self.lowrank!r}")

    @property
    def method(self) -> str:
        """The stage that produced the layer's current form (the last of ``methods``)."""
        return self.methods[-1]

    @property
    def quantized(self) -> bool:
        return self.scheme is not None

    def then(self, later: LayerRecord) -> LayerRecord:
        """This layer after ``later`` (a later stage's record of it): the methods chain, the later stage's
        facts, and every fact of this record the later one does not override (a value it leaves None):
        prune then quantize keeps the sparsity pattern, the shapes and scheme are the later stage's."""
        if later.name != self.name:
            raise CompressError(f"cannot merge the record of {later.name} into that of {self.name}")

        def pick(key: str) -> Any:
            value = getattr(later, key)
            return getattr(self, key) if value is None else value

        return replace(later, methods=self.methods + later.methods, tags=self.tags + later.tags,
                       **{key: pick(key) for key in ("scheme", "format", *FACT_FIELDS, "rel_weight_error")})

    # ---- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready and lossless: ``from_dict(to_dict())`` is an equal record (the scheme as the
        compressed-tensors ``weights`` / ``input_activations`` blocks)."""
        return {
            "name": self.name,
            "methods": list(self.methods),
            "tags": list(self.tags),
            "in_features": self.in_features,
            "out_features": self.out_features,
            "scheme": None if self.scheme is None else _scheme_dict(self.scheme),
            "format": self.format,
            "observer": self.observer,
            "actorder": self.actorder,
            "sparsity": self.sparsity,
            "rel_weight_error": self.rel_weight_error,
            **({} if self.lowrank is None else {"lowrank": self.lowrank}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> LayerRecord:
        """The record ``to_dict`` wrote; CompressError (one sentence) for anything else."""
        try:
            scheme = data["scheme"]
            return cls(name=str(data["name"]), methods=tuple(map(str, data["methods"])),
                       tags=tuple(map(str, data["tags"])), in_features=int(data["in_features"]),
                       out_features=int(data["out_features"]),
                       scheme=None if scheme is None else QuantScheme.from_config_group(scheme),
                       format=data.get("format"), observer=data.get("observer"), actorder=data.get("actorder"),
                       sparsity=data.get("sparsity"), rel_weight_error=data.get("rel_weight_error"),
                       lowrank=data.get("lowrank"))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CompressError(f"a saved layer record is malformed ({type(error).__name__}: {error})") from None

    def summary(self) -> dict[str, Any]:
        """The compact entry ``manifest.json`` lists: the scheme in words, the error to 6 significant
        digits (deterministic: a pure function of the record)."""
        return {
            "name": self.name,
            "methods": list(self.methods),
            "scheme": None if self.scheme is None else scheme_text(self.scheme),
            "observer": self.observer,
            "actorder": self.actorder,
            "sparsity": self.sparsity,
            "rel_weight_error": _round(self.rel_weight_error),
            **({} if self.lowrank is None else {"lowrank_rank": self.lowrank}),
        }

    def report_entry(self) -> dict[str, Any]:
        """The entry of ``report.json``'s ``layers``: one stage's metrics for one layer, as it always was
        (``scheme`` is the stage's tag)."""
        return {"name": self.name, "method": self.method, "scheme": self.tags[-1], "in_features": self.in_features,
                "out_features": self.out_features, "rel_weight_error": self.rel_weight_error,
                **({} if self.lowrank is None else {"lowrank_rank": self.lowrank})}


class LayerRecords(Mapping[str, LayerRecord]):
    """One record per layer, by name, in the order layers were first recorded (the sweep's order).

    Built from a history of per-stage records (``LayerRecords(history)``): a layer recorded again is merged
    with ``LayerRecord.then``. Immutable; ``merge`` returns a new container.
    """

    def __init__(self, records: Iterable[LayerRecord] = ()) -> None:
        by_name: dict[str, LayerRecord] = {}
        for record in records:
            earlier = by_name.get(record.name)
            by_name[record.name] = record if earlier is None else earlier.then(record)
        self._by_name = by_name

    def __getitem__(self, name: str) -> LayerRecord:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        return f"LayerRecords({list(self._by_name.values())!r})"

    def merge(self, later: Iterable[LayerRecord]) -> LayerRecords:
        """These records, then ``later`` ones (a later stage's, or a ``LayerRecords``) merged in."""
        more = later.values() if isinstance(later, LayerRecords) else later
        return LayerRecords([*self._by_name.values(), *more])

    def sparse(self) -> dict[str, str]:
        """Pruned layers → their pattern."""
        return {name: r.sparsity for name, r in self._by_name.items() if r.sparsity is not None}

    def to_list(self) -> list[dict[str, Any]]:
        return [record.to_dict() for record in self._by_name.values()]

    @classmethod
    def from_list(cls, data: Any) -> LayerRecords:
        if not isinstance(data, list):
            raise CompressError("saved layer records must be a list")
        return cls(LayerRecord.from_dict(item) for item in data)


def _scheme_dict(scheme: QuantScheme) -> dict[str, Any]:
    """The scheme as a config group's ``weights`` / ``input_activations`` blocks (what ``from_config_group`` reads)."""
    return {"weights": None if scheme.weights is None else scheme.weights.to_dict(),
            "input_activations": None if scheme.input_activations is None else scheme.input_activations.to_dict()}


def _args_text(args: QuantArgs) -> str:
    granularity = f"g{args.group_size}" if args.strategy == "group" else args.strategy
    words = [f"{args.type}{args.num_bits}", granularity, "sym" if args.symmetric else "asym"]
    return " ".join(words + (["dynamic"] if args.dynamic else []))


def scheme_text(scheme: QuantScheme) -> str:
    """A scheme in a few words: ``int4 g128 sym``, ``float8 channel sym``; input activations after a
    comma (``int8 channel sym, input int8 token sym dynamic``)."""
    parts = [] if scheme.weights is None else [_args_text(scheme.weights)]
    if scheme.input_activations is not None:
        parts.append(f"input {_args_text(scheme.input_activations)}")
    return ", ".join(parts)


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return value
    return float(f"{value:.6g}")

"""Typed per-layer records: lossless round trip, the merge rule, the compact scheme text."""

from __future__ import annotations

import json

import pytest

from compress.core.errors import CompressError
from compress.core.qargs import QuantArgs
from compress.core.records import LayerRecord, LayerRecords, scheme_text
from compress.core.scheme import QuantScheme

NAME = "model.layers.0.mlp.down_proj"


def _pruned(name: str = NAME) -> LayerRecord:
    return LayerRecord(name, ("sparsegpt",), ("sparsegpt-2of4",), 128, 64, sparsity="2:4")


def _quantized(name: str = NAME, **facts) -> LayerRecord:
    return LayerRecord(name, ("gptq",), ("w4g32a",), 128, 64, scheme=QuantScheme(4, 32, False),
                       format="pack-quantized", **{"observer": "mse", "actorder": "weight",
                                                   "rel_weight_error": 0.0123456789, **facts})


@pytest.mark.parametrize("record", [
    _pruned(),
    _quantized(),
    _pruned().then(_quantized()),
    LayerRecord("fc", ("codec",), ("wfp8a8d",), 64, 32, format="float-quantized", observer="minmax",
                scheme=QuantScheme(weights=QuantArgs(num_bits=8, type="float", strategy="channel"),
                                   input_activations=QuantArgs(num_bits=8, type="float", strategy="token",
                                                               dynamic=True))),
], ids=["pruned", "quantized", "merged", "fp8-activations"])
def test_round_trip_is_lossless(record: LayerRecord) -> None:
    data = json.loads(json.dumps(record.to_dict()))  # it is stored as JSON (resume state)
    again = LayerRecord.from_dict(data)
    assert again == record
    assert again.to_dict() == record.to_dict()  # the scheme's args too (equality ignores observer/actorder there)
    assert type(again.methods) is tuple and (again.scheme is None) == (record.scheme is None)
    listed = LayerRecords.from_list(json.loads(json.dumps(LayerRecords([record]).to_list())))
    assert list(listed.values()) == [record]


def test_malformed_records_are_refused_in_one_sentence() -> None:
    with pytest.raises(CompressError, match="malformed"):
        LayerRecord.from_dict({"name": "x"})
    with pytest.raises(CompressError, match="one tag per method"):
        LayerRecord("x", ("rtn", "gptq"), ("w4",), 8, 8)
    with pytest.raises(CompressError, match="actorder"):
        LayerRecord("x", ("gptq",), ("w4",), 8, 8, actorder="sideways")


def test_merge_keeps_what_the_later_stage_does_not_override() -> None:
    """Prune then quantize: the chain of methods, the quantizer's scheme and facts, and the pruner's pattern."""
    merged = _pruned().then(_quantized())
    assert merged.methods == ("sparsegpt", "gptq") and merged.method == "gptq"
    assert merged.tags == ("sparsegpt-2of4", "w4g32a")
    assert merged.sparsity == "2:4"
    assert (merged.scheme, merged.format, merged.observer, merged.actorder) == (
        QuantScheme(4, 32, False), "pack-quantized", "mse", "weight")
    assert merged.rel_weight_error == pytest.approx(0.0123456789)
    # a later stage's own value wins over the earlier one
    assert _quantized(observer="minmax").then(_quantized()).observer == "mse"
    with pytest.raises(CompressError, match="cannot merge"):
        _pruned("a").then(_quantized("b"))


def test_records_fold_a_history_in_first_seen_order() -> None:
    history = [_pruned("b"), _pruned("a"), _quantized("b"), _quantized("a")]
    records = LayerRecords(history)
    assert list(records) == ["b", "a"] and len(records) == 2
    assert all(r.methods == ("sparsegpt", "gptq") and r.sparsity == "2:4" for r in records.values())
    assert records.sparse() == {"b": "2:4", "a": "2:4"}
    later = LayerRecords([_pruned("a")]).merge([_quantized("a")])
    assert later["a"] == records["a"]
    assert LayerRecords([_pruned("a")]).merge(LayerRecords([_quantized("a")]))["a"] == records["a"]


def test_summary_is_compact_and_rounded() -> None:
    summary = _pruned().then(_quantized()).summary()
    assert summary == {"name": NAME, "methods": ["sparsegpt", "gptq"], "scheme": "int4 g32 asym",
                       "observer": "mse", "actorder": "weight", "sparsity": "2:4", "rel_weight_error": 0.0123457}
    assert _pruned().summary()["scheme"] is None and _pruned().summary()["rel_weight_error"] is None
    assert _quantized().report_entry() == {"name": NAME, "method": "gptq", "scheme": "w4g32a", "in_features": 128,
                                           "out_features": 64, "rel_weight_error": 0.0123456789}


def test_scheme_text() -> None:
    assert scheme_text(QuantScheme(4, 128)) == "int4 g128 sym"
    assert scheme_text(QuantScheme(8, -1, False)) == "int8 channel asym"
    fp8 = QuantScheme(weights=QuantArgs(num_bits=8, type="float", strategy="channel"),
                      input_activations=QuantArgs(num_bits=8, type="float", strategy="token", dynamic=True))
    assert scheme_text(fp8) == "float8 channel sym, input float8 token sym dynamic"

"""Gates: messages a user reads, the encoder error, and GateFailed carrying the report."""

from __future__ import annotations

import pytest

from compress.core.errors import CompressError, GateFailed
from compress.evaluate.gates import check_gates, raise_if_failed


def test_failing_ppl_gate_message():
    (gate,) = check_gates({"ppl_increase": 0.0731}, max_ppl_increase=0.05)
    assert not gate.passed and gate.name == "max_ppl_increase" and gate.value == 0.0731
    assert gate.message == "perplexity increase 7.31% exceeds --max-ppl-increase 5.00% by 2.31 points"


def test_passing_gates_and_order():
    metrics = {"ppl_increase": 0.02, "compression_ratio": 3.5, "cosine": None}
    gates = check_gates(metrics, max_ppl_increase=0.05, min_compression_ratio=3.5)
    assert [g.name for g in gates] == ["max_ppl_increase", "min_compression_ratio"]
    assert all(g.passed for g in gates)  # equality passes
    assert gates[0].message == "perplexity increase 2.00% within --max-ppl-increase 5.00%"
    raise_if_failed(gates, {})
    assert check_gates(metrics) == []


def test_min_gates_fail_below_threshold_and_on_nan():
    ratio, cosine = check_gates(
        {"compression_ratio": 2.1, "cosine": 0.98}, min_compression_ratio=3, min_cosine=0.99
    )
    assert (
        not ratio.passed
        and ratio.message == "compression ratio 2.10x is below --min-compression-ratio 3.00x by 0.90"
    )
    assert not cosine.passed and "0.9800" in cosine.message and "--min-cosine 0.9900" in cosine.message
    (nan,) = check_gates({"ppl_increase": float("nan")}, max_ppl_increase=0.05)
    assert not nan.passed and "NaN" in nan.message


def test_ppl_gate_on_an_encoder_is_bad_input():
    with pytest.raises(CompressError) as err:
        check_gates({"cosine": 0.99, "compression_ratio": 3.0}, max_ppl_increase=0.05)
    assert str(err.value) == "--max-ppl-increase needs perplexity, which does not apply to encoder models"
    with pytest.raises(CompressError, match="--min-cosine"):
        check_gates({"ppl_increase": 0.01}, min_cosine=0.99)


def test_raise_if_failed_joins_messages_and_carries_report():
    gates = check_gates(
        {"ppl_increase": 0.1, "compression_ratio": 1.5}, max_ppl_increase=0.05, min_compression_ratio=2
    )
    report = {"eval": {"ppl_increase": 0.1}}
    with pytest.raises(GateFailed) as err:
        raise_if_failed(gates, report)
    assert str(err.value) == "; ".join(g.message for g in gates) and str(err.value).count("; ") == 1
    assert err.value.report is report

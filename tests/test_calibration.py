"""Temperature calibration on literal values: the fit, ECE, the reliability table, the manifest
record (old manifests load uncalibrated) and what serving reports from it."""

from __future__ import annotations

import base64
import json
import math
from datetime import UTC, datetime

import numpy as np
import pytest

from plaudit.services.common.calibration import (
    MIN_PAIRS,
    T_MAX,
    T_MIN,
    calibrate,
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    heldout_figures,
    negative_log_likelihood,
    reliability,
    sigmoid,
)
from plaudit.services.common.registry import (
    ManifestSigner,
    ModelManifest,
    TrustedKeys,
    canonical_manifest_bytes,
)
from plaudit.trainer.objective import calibration_error
from plaudit.trainer.promotion import gate_decision

SIGMOID_1 = 0.7310585786300049  # sigmoid(1)


def test_three_right_one_wrong_at_equal_margins_fits_sigmoid_to_three_quarters() -> None:
    """Margins (1, 1, 1, -1), plain maximum likelihood: the NLL is least where sigmoid(1 / T)
    = 3/4, T = 1 / ln 3."""
    margins = [1.0, 1.0, 1.0, -1.0]
    t = fit_temperature(margins, smoothing=False)
    assert t == pytest.approx(0.9102392266268373, abs=1e-9)
    assert t == pytest.approx(1 / math.log(3), abs=1e-9)
    assert float(sigmoid(1 / t)) == pytest.approx(0.75, abs=1e-9)
    # at T = 1 each bin (0.2-0.3 and 0.7-0.8, 4 items each) is off by 0.75 - sigmoid(1)
    assert expected_calibration_error(margins) == pytest.approx(0.75 - SIGMOID_1, abs=1e-12)
    assert expected_calibration_error(margins) == pytest.approx(0.0189414213699951, abs=1e-9)
    assert expected_calibration_error(margins, t) == pytest.approx(0.0, abs=1e-9)
    assert negative_log_likelihood(margins, t) == pytest.approx(0.5623351446188083, abs=1e-9)
    assert negative_log_likelihood(margins, 1.0) == pytest.approx(0.5632616875182228, abs=1e-9)


def test_two_right_one_wrong_at_margin_two_fits_a_temperature_above_one() -> None:
    """Margins (2, 2, -2): sigmoid(2 / T) = 2/3, so T = 2 / ln 2 (the model is overconfident)."""
    t = fit_temperature([2.0, 2.0, -2.0], smoothing=False)
    assert t == pytest.approx(2.8853900817779268, abs=1e-9)
    assert t == pytest.approx(2 / math.log(2), abs=1e-9)
    scaled = fit_temperature(np.array([2.0, 2.0, -2.0]) * 5, smoothing=False)
    assert scaled == pytest.approx(5 * t, abs=1e-8)


def test_smoothed_targets_follow_platt() -> None:
    """Target (n + 1) / (n + 2) per pair. Equal margins, k of n right: sigmoid(1 / T) =
    ((2k - n) target + n - k) / n."""
    # (1, 1, 1, -1): target 5/6, sigmoid(1 / T) = 2/3, T = 1 / ln 2; ECE |2/3 - 3/4| = 1/12
    t = fit_temperature([1.0, 1.0, 1.0, -1.0])
    assert t == pytest.approx(1.4426950408889634, abs=1e-9)
    assert expected_calibration_error([1.0, 1.0, 1.0, -1.0], t) == pytest.approx(1 / 12, abs=1e-9)
    # all four right: plain likelihood would drive T to 0; smoothed, sigmoid(1 / T) = 5/6
    assert fit_temperature([1.0, 1.0, 1.0, 1.0]) == pytest.approx(0.6213349345596119, abs=1e-9)
    assert fit_temperature([1.0, 1.0, 1.0, 1.0], smoothing=False) == T_MIN


def test_unreachable_optima_stop_at_the_bounds_and_degenerate_inputs_keep_one() -> None:
    assert fit_temperature([1.0, 2.0, 3.0], smoothing=False) == T_MIN  # separable, unsmoothed
    assert fit_temperature([1.0, 2.0, 3.0]) == pytest.approx(1.609264328732619, abs=1e-9)
    assert fit_temperature([-1.0, -2.0, 1.0]) == T_MAX  # worse than chance: as flat as allowed
    assert fit_temperature([]) == 1.0
    assert fit_temperature([0.0, 0.0]) == 1.0
    with pytest.raises(ValueError, match="finite"):
        fit_temperature([1.0, float("nan")])


def test_the_fit_minimises_the_likelihood_on_a_random_sample() -> None:
    rng = np.random.default_rng(0)
    margins = rng.normal(0.5, 2.0, 200)
    t = fit_temperature(margins, smoothing=False)
    best = negative_log_likelihood(margins, t)
    for other in (t * 0.99, t * 1.01, 1.0):
        assert best <= negative_log_likelihood(margins, other) + 1e-12
    assert fit_temperature(margins, smoothing=False) == t  # deterministic


def test_temperature_one_is_the_plain_sigmoid_and_ece_stays_in_unit_interval() -> None:
    margins = np.array([3.0, -0.5, 0.0, 12.0, -7.0])
    np.testing.assert_allclose(sigmoid(margins / 1.0), 1 / (1 + np.exp(-margins)), rtol=1e-12)
    for t in (T_MIN, 0.5, 1.0, 3.0, T_MAX):
        assert 0.0 <= expected_calibration_error(margins, t) <= 1.0
    assert math.isnan(expected_calibration_error([]))


def test_reliability_table_counts_each_pair_in_both_orders() -> None:
    table = reliability([1.0, 1.0, 1.0, -1.0])
    assert [(b.center, b.count) for b in table.bins] == [(0.25, 4), (0.75, 4)]
    low, high = table.bins
    assert high.mean_predicted == pytest.approx(SIGMOID_1, abs=1e-12)
    assert high.observed == 0.75 and low.observed == 0.25
    assert low.mean_predicted == pytest.approx(1 - SIGMOID_1, abs=1e-12)
    # a tie lands in the bin holding 0.5, twice, observed half the time
    (tie,) = reliability([0.0]).bins
    assert (tie.center, tie.count, tie.mean_predicted, tie.observed) == (0.55, 2, 0.5, 0.5)


def test_trainer_ece_is_the_same_computation() -> None:
    chosen, rejected = np.array([1.0, 0.3, -2.0, 4.0]), np.array([0.0, 0.5, 1.0, 0.0])
    assert calibration_error(chosen, rejected) == expected_calibration_error(chosen - rejected)


def test_calibrate_records_before_and_after() -> None:
    chosen = np.array([1.0, 1.0, 1.0, 0.0] * 6)
    rejected = np.array([0.0, 0.0, 0.0, 1.0] * 6)
    c = calibrate(chosen, rejected)  # 18 of 24 right: target 25/26, sigmoid(1 / T) = 19/26
    assert c.fitted and c.pairs == 24 and c.accuracy == 0.75
    assert c.temperature == pytest.approx(1 / math.log(19 / 7), abs=1e-9)
    assert c.temperature == pytest.approx(1.001473337418519, abs=1e-9)
    assert c.ece_before == pytest.approx(0.0189414213699951, abs=1e-9)
    assert c.ece_after == pytest.approx(1 / 52, abs=1e-9)  # |19/26 - 3/4|
    plain = calibrate(chosen, rejected, smoothing=False)
    assert plain.temperature == pytest.approx(1 / math.log(3), abs=1e-9)
    assert plain.ece_after == pytest.approx(0.0, abs=1e-9)
    assert plain.nll_after == pytest.approx(0.5623351446188083, abs=1e-9)
    assert plain.nll_before == pytest.approx(0.5632616875182228, abs=1e-9)  # > nll_after
    assert [b.count for b in c.reliability_after] == [24, 24]
    assert c.reliability_after[1].mean_predicted == pytest.approx(19 / 26, abs=1e-9)
    metrics = calibration_metrics(c)
    assert metrics["calibration/temperature"] == c.temperature
    assert metrics["eval/ece"] == c.ece_after and metrics["eval/ece_uncalibrated"] == c.ece_before


def test_too_few_held_out_pairs_keep_temperature_one_and_say_so() -> None:
    n = MIN_PAIRS - 1
    c = calibrate(np.full(n, 2.0), np.zeros(n))
    assert c.temperature == 1.0 and not c.fitted and c.pairs == n
    assert f"only {n} held-out pairs" in c.note and "kept at 1" in c.note
    assert c.ece_before == c.ece_after == pytest.approx(1 - float(sigmoid(2.0)), abs=1e-12)


def _manifest(**extra: object) -> dict[str, object]:
    return {
        "version": "reward-old",
        "kind": "reward",
        "created_at": datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
        "backbone": "tiny",
        "onnx_files": {"fp32": "model.onnx"},
        "text_format": {"kind": "pair"},
        "input_names": ["input_ids"],
        "metrics": {"eval/accuracy": 0.8, "eval/calibration_error": 0.05, "eval/pairs": 40.0},
        **extra,
    }


def test_a_manifest_from_before_calibration_loads_with_temperature_one() -> None:
    manifest = ModelManifest.model_validate(_manifest())
    assert manifest.calibration is None and manifest.temperature == 1.0
    figures = heldout_figures(manifest)  # the trainer's figures, at T = 1 as it serves
    assert (figures.accuracy, figures.ece, figures.pairs) == (0.8, 0.05, 40)


def test_a_signed_manifest_with_calibration_verifies_and_a_changed_temperature_does_not() -> None:
    signer = ManifestSigner.generate()
    c = calibrate(np.array([1.0, 1.0, 1.0, 0.0] * 6), np.array([0.0, 0.0, 0.0, 1.0] * 6))
    signed = signer.sign(ModelManifest.model_validate(_manifest(calibration=c.model_dump())))
    raw = signed.model_dump_json().encode()
    trusted = TrustedKeys.from_pem(signer.public_pem())
    trusted.check("reward-old", raw)
    assert ModelManifest.model_validate_json(raw).temperature == pytest.approx(c.temperature)
    figures = heldout_figures(signed)
    assert (figures.accuracy, figures.pairs) == (0.75, 24)
    tampered = signed.model_copy(update={"calibration": c.model_copy(update={"temperature": 2.0})})
    with pytest.raises(Exception, match="bad manifest signature"):
        trusted.check("reward-old", tampered.model_dump_json().encode())
    # a version signed before the field existed (its JSON has no "calibration" key) verifies
    old = _manifest()
    value = base64.b64encode(signer._key.sign(canonical_manifest_bytes(old))).decode()
    old["signature"] = {"algorithm": "ed25519", "key_id": signer.key_id, "value": value}
    trusted.check("reward-old", json.dumps(old).encode())
    assert ModelManifest.model_validate(old).temperature == 1.0


def test_gate_shows_calibrated_ece_side_by_side_without_deciding_on_it() -> None:
    record = gate_decision(
        candidate_accuracy=0.631,
        correct=53,
        n=84,
        live_version="v-live",
        live_accuracy=0.595,
        candidate_ece=0.0412,
        live_ece=0.1234,
    )
    assert record["promoted"] is True
    assert record["candidate_ece"] == 0.0412 and record["current_ece"] == 0.1234
    assert record["reason"].startswith(
        "candidate 0.631 vs live 0.595 on the same 84 held-out pairs "
        "(calibrated ECE 0.041 vs 0.123)"
    )
    alone = gate_decision(
        candidate_accuracy=0.631, correct=53, n=84, live_version=None, live_accuracy=None,
        candidate_ece=0.0412,
    )  # fmt: skip
    assert "on 84 held-out pairs (calibrated ECE 0.041)" in alone["reason"]
    unknown = gate_decision(
        candidate_accuracy=0.631, correct=53, n=84, live_version="v1", live_accuracy=0.5,
        candidate_ece=0.0412, live_ece=None,
    )  # fmt: skip
    assert "(calibrated ECE 0.041 vs n/a)" in unknown["reason"]

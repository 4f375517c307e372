"""Objectives and shadow statistics as pure functions, against values computed by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from plaudit.services.common.errors import InvalidArgumentError
from plaudit.services.reward.core import check_tags
from plaudit.services.reward.objectives import (
    GatedObjective,
    WeightedObjective,
    load_objectives,
)
from plaudit.services.reward.shadow import (
    ShadowStats,
    average_ranks,
    pair_agreement,
    spearman,
)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_weighted_sums_the_standardized_rewards() -> None:
    objective = WeightedObjective(
        name="both", kind="weighted", weights={"helpfulness": 1.0, "safety": 0.5}
    )
    z = {"helpfulness": np.array([1.0, -2.0]), "safety": np.array([4.0, 2.0])}
    got = objective.combine(z, [frozenset(), frozenset()])
    np.testing.assert_allclose(got, [1.0 + 2.0, -2.0 + 1.0])
    assert objective.models == ("helpfulness", "safety")


def test_gated_follows_llama2_tag_threshold_and_whitening() -> None:
    """R_s = sigmoid(z_s) < 0.15 <=> z_s < logit(0.15) = -1.7346; tagged prompts always take the
    safety reward; the result is (LOGIT(R_c) - mean) / std = (z_c - mean) / std."""
    objective = GatedObjective(
        name="llama2",
        kind="gated",
        safety_model="safety",
        helpfulness_model="helpfulness",
        threshold=0.15,
        whiten_mean=0.5,
        whiten_std=2.0,
    )
    z_s = np.array([0.3, -2.0, 1.2, -1.7])  # -2.0 < -1.7346 < -1.7
    z_h = np.array([5.0, 6.0, 7.0, 8.0])
    tags = [frozenset(), frozenset(), frozenset({"safety"}), frozenset({"other"})]
    got = objective.combine({"safety": z_s, "helpfulness": z_h}, tags)
    # item 0: safe enough, untagged -> helpfulness; 1: below threshold -> safety;
    # 2: tagged -> safety; 3: just above threshold, other tag -> helpfulness
    expected = [(5.0 - 0.5) / 2, (-2.0 - 0.5) / 2, (1.2 - 0.5) / 2, (8.0 - 0.5) / 2]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert logit(0.15) == pytest.approx(-1.7346, abs=1e-4)


def test_objectives_file_is_checked_against_the_served_models(tmp_path: Path) -> None:
    good = tmp_path / "objectives.json"
    good.write_text(
        json.dumps(
            {
                "objectives": [
                    {"name": "both", "kind": "weighted", "weights": {"a": 1, "b": 1}},
                    {
                        "name": "gate",
                        "kind": "gated",
                        "safety_model": "b",
                        "helpfulness_model": "a",
                    },
                ]
            }
        )
    )
    loaded = load_objectives(good, ["a", "b"])
    assert list(loaded) == ["both", "gate"]
    assert isinstance(loaded["gate"], GatedObjective) and loaded["gate"].threshold == 0.15
    with pytest.raises(InvalidArgumentError, match="does not serve") as missing:
        load_objectives(good, ["a"])
    assert missing.value.field == "objectives[0]"
    toml = tmp_path / "objectives.toml"
    toml.write_text('[[objectives]]\nname = "w"\nkind = "weighted"\nweights = { a = 2.0 }\n')
    assert load_objectives(toml, ["a"])["w"].models == ("a",)
    bad = tmp_path / "bad.json"
    gate = {"name": "x", "kind": "gated", "safety_model": "a", "helpfulness_model": "b"}
    bad.write_text(json.dumps({"objectives": [{**gate, "threshold": 2}]}))
    with pytest.raises(InvalidArgumentError) as err:
        load_objectives(bad, ["a", "b"])
    assert err.value.field == "objectives[0].threshold"
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps({"objectives": [
        {"name": "x", "kind": "weighted", "weights": {"a": 1}}] * 2}))  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="defined twice"):
        load_objectives(twice, ["a"])


def test_tags_are_checked_and_named() -> None:
    assert check_tags("tags", ["safety", "medical"]) == frozenset({"safety", "medical"})
    with pytest.raises(InvalidArgumentError) as err:
        check_tags("items[2].tags", ["ok", "Not OK"])
    assert err.value.field == "items[2].tags[1]"
    with pytest.raises(InvalidArgumentError, match="limit is 16"):
        check_tags("tags", [f"t{i}" for i in range(17)])


def test_pair_agreement_counts_orders_and_half_ties() -> None:
    live = np.array([1.0, 2.0, 3.0])
    # pairs (0,1) (0,2) (1,2): same order, same order, a tie in the shadow -> 1 + 1 + 0.5
    assert pair_agreement(live, np.array([0.0, 5.0, 5.0])) == (2.5, 3)
    # reversed, reversed, tie -> 0 + 0 + 0.5
    assert pair_agreement(live, np.array([6.0, 5.0, 5.0])) == (0.5, 3)
    assert pair_agreement(np.array([1.0, 0.0]), np.array([3.0, 2.0])) == (1.0, 1)


def test_spearman_and_average_ranks() -> None:
    np.testing.assert_allclose(average_ranks(np.array([10.0, 30.0, 20.0, 20.0])),
                               [1.0, 4.0, 2.5, 2.5])  # fmt: skip
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 2.0]), np.array([2.0, 1.0])) is None  # too few items
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0])) is None


def test_shadow_stats_accumulate() -> None:
    stats = ShadowStats("v2", 0.5)
    stats.add(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]))
    stats.add(np.array([0.0, 1.0]), np.array([1.0, 0.0]))
    assert (stats.requests, stats.pairs, stats.agreement) == (2, 4, 0.75)
    assert stats.rankings == 1 and stats.correlation_sum == pytest.approx(1.0)
    assert stats.live.mean == pytest.approx(7 / 5)
    message = stats.message()
    assert message.version == "v2" and message.agreement == pytest.approx(0.75)
    assert message.shadow_std == pytest.approx(np.std([1.0, 2.0, 3.0, 1.0, 0.0]), rel=1e-6)

"""Data quality of preference judgements: consensus weights, agreement, outlier annotators.

Votes. Judgements are grouped by (prompt, unordered pair of completions, criterion): votes on
different criteria (``safety`` and ``helpfulness`` of the same pair) never meet. Each annotator
has one
vote per group: their latest judgement (an annotator who judges the same pair twice is counted
once; one who changes their mind counts with the newer view). Votes with no preference (equal
ratings) abstain. So an exact duplicate from a different annotator is one more agreeing vote, not
one more training row.

Consensus and weight. With ``agree`` votes on the majority side and ``disagree`` on the other::

    weight = agree / (agree + disagree)          # the majority share, in (0.5, 1]

A unanimous group has weight 1 (a single vote too); a contradicted group (A>B and B>A both
voted) is exported in the majority direction with its reduced weight; an exact tie is dropped.
``margin`` is the mean margin of the majority votes that carry one.

Agreement. Over groups with at least two (non-abstaining) votes, raw agreement is the mean share
of agreeing annotator pairs per group. Chance-corrected agreement is Cohen's kappa when exactly
two annotators voted on shared groups, otherwise Fleiss' kappa (with the usual generalisation to a
varying number of votes per group). The two categories are the canonical orientations, "first
preferred" and "second preferred".

Outliers. For each annotator, each of their votes in a group where the other annotators hold a
strict majority is compared with that leave-one-out majority. Under the null hypothesis every
annotator disagrees at the pooled rate ``p`` (all disagreements / all such votes); an annotator
with ``d`` disagreements in ``n`` votes is flagged when the one-sided binomial tail
``P(X >= d | n, p)`` is below ``alpha / m`` (Bonferroni over the ``m`` annotators tested), the
test Chatbot Arena uses to find anomalous voters.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from plaudit.services.feedback.domain import DEFAULT_CRITERION, Judgement

GroupKey = tuple[str, str, str, str]
"""(prompt, first, second, criterion) with ``first < second``."""


def group_key(judgement: Judgement) -> GroupKey:
    return (judgement.prompt, judgement.first, judgement.second, judgement.criterion)


def pair_key(key: tuple[str, ...]) -> str:
    """A stable short id (hex) of a group, for readers that deduplicate exported pairs.

    The criterion ``overall`` is left out of the hash, so pairs keep the keys they had before
    criteria existed."""
    if len(key) == 4 and key[3] == DEFAULT_CRITERION:
        key = key[:3]
    digest = hashlib.blake2b(digest_size=16)
    for part in key:
        encoded = part.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    return digest.hexdigest()


def latest_votes(judgements: Iterable[Judgement]) -> dict[GroupKey, dict[str, Judgement]]:
    """Each annotator's latest judgement in each group."""
    votes: dict[GroupKey, dict[str, Judgement]] = {}
    for judgement in judgements:
        group = votes.setdefault(group_key(judgement), {})
        current = group.get(judgement.annotator_id)
        if current is None or judgement.position > current.position:
            group[judgement.annotator_id] = judgement
    return votes


# -- consensus ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairConsensus:
    """The consensus of one group's votes; ``preference`` 0 means a tie (nothing to export)."""

    key: GroupKey
    preference: int
    agree: int
    disagree: int
    weight: float
    margin: float | None
    representative: Judgement | None  # the latest vote on the majority side
    last_position: tuple[int, int]  # the latest judgement of the group, superseded ones included
    tags: tuple[str, ...] = ()  # union of the prompt tags of every judgement in the group

    @property
    def prompt(self) -> str:
        return self.key[0]

    @property
    def criterion(self) -> str:
        return self.key[3]

    @property
    def chosen(self) -> str:
        return self.key[2] if self.preference < 0 else self.key[1]

    @property
    def rejected(self) -> str:
        return self.key[1] if self.preference < 0 else self.key[2]

    @property
    def contradicted(self) -> bool:
        return self.disagree > 0


def consensus_of(
    key: GroupKey,
    votes: Sequence[Judgement],
    last_position: tuple[int, int],
    tags: Iterable[str] = (),
) -> PairConsensus:
    """Majority direction, majority-share weight and mean margin of one group's latest votes."""
    positive = [v for v in votes if v.preference > 0]
    negative = [v for v in votes if v.preference < 0]
    tag_union = tuple(sorted(set(tags)))
    if len(positive) == len(negative):
        return PairConsensus(
            key, 0, len(positive), len(negative), 0.0, None, None, last_position, tag_union
        )
    majority, minority = (
        (positive, negative) if len(positive) > len(negative) else (negative, positive)
    )
    margins = [v.margin for v in majority if v.margin is not None]
    return PairConsensus(
        key=key,
        preference=majority[0].preference,
        agree=len(majority),
        disagree=len(minority),
        weight=len(majority) / (len(majority) + len(minority)),
        margin=sum(margins) / len(margins) if margins else None,
        representative=max(majority, key=lambda v: v.position),
        last_position=last_position,
        tags=tag_union,
    )


def build_consensus(
    judgements: Iterable[Judgement], exclude_annotators: frozenset[str] = frozenset()
) -> dict[GroupKey, PairConsensus]:
    """The consensus of every group, leaving out the votes of ``exclude_annotators``.

    A group's ``tags`` are the union over all its kept judgements (superseded votes included)."""
    kept = [j for j in judgements if j.annotator_id not in exclude_annotators]
    last: dict[GroupKey, tuple[int, int]] = {}
    tags: dict[GroupKey, set[str]] = {}
    for judgement in kept:
        key = group_key(judgement)
        if key not in last or judgement.position > last[key]:
            last[key] = judgement.position
        tags.setdefault(key, set()).update(judgement.tags)
    return {
        key: consensus_of(key, list(group.values()), last[key], tags[key])
        for key, group in latest_votes(kept).items()
    }


# -- agreement statistics ----------------------------------------------------------------------
def cohen_kappa(rater_a: Sequence[Hashable], rater_b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters' labels of the same items; NaN when chance agreement is 1."""
    if len(rater_a) != len(rater_b):
        raise ValueError("both raters must label the same items")
    n = len(rater_a)
    if n == 0:
        return math.nan
    observed = sum(a == b for a, b in zip(rater_a, rater_b, strict=True)) / n
    categories = set(rater_a) | set(rater_b)
    expected = sum(
        (sum(a == c for a in rater_a) / n) * (sum(b == c for b in rater_b) / n) for c in categories
    )
    if expected >= 1.0:
        return math.nan
    return (observed - expected) / (1.0 - expected)


def _per_item_agreement(counts: Sequence[Sequence[int]]) -> list[float]:
    shares = []
    for row in counts:
        n = sum(row)
        if n < 2:
            raise ValueError("every item needs at least two ratings")
        shares.append((sum(c * c for c in row) - n) / (n * (n - 1)))
    return shares


def raw_agreement(counts: Sequence[Sequence[int]]) -> float:
    """Mean share of agreeing rater pairs per item; ``counts[i][j]``: raters of item i saying j."""
    if not counts:
        return math.nan
    shares = _per_item_agreement(counts)
    return sum(shares) / len(shares)


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa from an items x categories table of rating counts.

    Items may have different numbers of raters (each at least two); category shares are then
    pooled over all ratings. NaN when chance agreement is 1 (a single category used).
    """
    if not counts:
        return math.nan
    observed = raw_agreement(counts)
    total = sum(sum(row) for row in counts)
    width = len(counts[0])
    shares = [sum(row[j] for row in counts) / total for j in range(width)]
    expected = sum(s * s for s in shares)
    if expected >= 1.0:
        return math.nan
    return (observed - expected) / (1.0 - expected)


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), computed in log space (exact up to rounding)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)

    def log_pmf(i: int) -> float:
        return (
            math.lgamma(n + 1)
            - math.lgamma(i + 1)
            - math.lgamma(n - i + 1)
            + i * log_p
            + (n - i) * log_q
        )

    def tail(indices: range) -> float:
        total = 0.0
        for i in indices:
            term = math.exp(log_pmf(i))
            total += term
            if term < total * 1e-17 and abs(i - n * p) > 1:
                break  # past the mode the terms only shrink
        return total

    if k > n * p:
        return min(1.0, tail(range(k, n + 1)))
    return max(0.0, 1.0 - tail(range(k - 1, -1, -1)))


@dataclass(frozen=True)
class AnnotatorOutlierTest:
    """One annotator's disagreement with the leave-one-out majority, and its binomial test."""

    annotator_id: str
    votes: int
    disagreements: int
    disagreement_rate: float
    p_value: float
    outlier: bool


def annotator_outlier_tests(
    votes_by_group: Mapping[Any, Mapping[str, int]],
    *,
    alpha: float = 0.05,
    min_votes: int = 1,
) -> list[AnnotatorOutlierTest]:
    """Test every annotator with at least ``min_votes`` comparable votes (see module doc).

    ``votes_by_group[group][annotator]`` is that annotator's preference (+1/-1; 0 abstains); the
    group keys can be anything hashable (the store uses :func:`pair_key`).
    Returned sorted by p-value, most suspicious first.
    """
    votes: dict[str, int] = {}
    disagreements: dict[str, int] = {}
    for group in votes_by_group.values():
        cast = {a: v for a, v in group.items() if v != 0}
        if len(cast) < 2:
            continue
        total = sum(1 if v > 0 else -1 for v in cast.values())
        for annotator, vote in cast.items():
            others = total - (1 if vote > 0 else -1)
            if others == 0:
                continue  # the others are split: no majority to compare with
            votes[annotator] = votes.get(annotator, 0) + 1
            if (others > 0) != (vote > 0):
                disagreements[annotator] = disagreements.get(annotator, 0) + 1
    tested = {a: n for a, n in votes.items() if n >= min_votes}
    if not tested:
        return []
    pooled = sum(disagreements.get(a, 0) for a in tested) / sum(tested.values())
    threshold = alpha / len(tested)
    results = []
    for annotator, n in tested.items():
        d = disagreements.get(annotator, 0)
        p_value = binomial_sf(d, n, pooled)
        results.append(
            AnnotatorOutlierTest(
                annotator_id=annotator,
                votes=n,
                disagreements=d,
                disagreement_rate=d / n,
                p_value=p_value,
                outlier=p_value < threshold and d / n > pooled,
            )
        )
    results.sort(key=lambda r: (r.p_value, r.annotator_id))
    return results


@dataclass(frozen=True)
class AgreementReport:
    """Inter-annotator agreement over groups judged by at least two annotators."""

    groups: int  # groups with at least one non-abstaining vote
    multi_annotated_groups: int  # ... with at least two
    contradicted_groups: int  # ... with votes in both directions
    tied_groups: int  # ... with as many votes each way (not exported)
    raw_agreement: float | None
    kappa: float | None
    kappa_method: str | None  # "cohen" (two annotators) or "fleiss" (more)
    outliers: tuple[AnnotatorOutlierTest, ...]  # every annotator tested, most suspicious first

    @property
    def outlier_annotators(self) -> frozenset[str]:
        return frozenset(t.annotator_id for t in self.outliers if t.outlier)


def agreement_report(
    votes_by_group: Mapping[Any, Mapping[str, int]], *, alpha: float = 0.05
) -> AgreementReport:
    """Agreement, contradictions and outlier tests of the latest votes (see module doc)."""
    groups = multi = contradicted = tied = 0
    table: list[list[int]] = []
    annotators: set[str] = set()
    for group in votes_by_group.values():
        cast = {a: v for a, v in group.items() if v != 0}
        if not cast:
            continue
        groups += 1
        positive = sum(1 for v in cast.values() if v > 0)
        negative = len(cast) - positive
        contradicted += positive > 0 and negative > 0
        tied += positive == negative
        if len(cast) >= 2:
            multi += 1
            table.append([positive, negative])
            annotators.update(cast)
    raw: float | None = None
    kappa: float | None = None
    method: str | None = None
    if table:
        raw = raw_agreement(table)
        if len(annotators) == 2:
            first, second = sorted(annotators)
            shared = [g for g in votes_by_group.values() if g.get(first) and g.get(second)]
            method = "cohen"
            kappa = cohen_kappa([g[first] for g in shared], [g[second] for g in shared])
        else:
            method = "fleiss"
            kappa = fleiss_kappa(table)
        if math.isnan(kappa):
            kappa = None
    outliers = tuple(annotator_outlier_tests(votes_by_group, alpha=alpha))
    return AgreementReport(groups, multi, contradicted, tied, raw, kappa, method, outliers)

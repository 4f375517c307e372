"""Feedback domain: the four kinds of human feedback, their validation, and what they imply.

Pure functions and value objects only; no database. The store persists each event once and
derives training examples from the stored events when they are exported:

* :class:`Comparison` - one pair, ``chosen`` preferred over ``rejected``.
* :class:`Ranking` - completions best first; stored once, it implies every pair K(K-1)/2.
* :class:`Rating` - a score on a declared scale (thumbs up/down is the 0..1 scale). Two ratings by
  the same annotator of different completions of one prompt on the same scale imply a pair whose
  margin is the score gap divided by the scale width; equal scores imply no preference. Each
  rating is also an unpaired example for KTO-style training (label: score above the midpoint).
* :class:`Correction` - an edited completion: the pair (corrected over completion) and a
  supervised (prompt, corrected) example.

Every event names the ``criterion`` it judges (default ``overall``; e.g. ``helpfulness``,
``safety``: one of :attr:`FeedbackLimits.accepted_criteria`) and may attach ``tags`` to its
prompt (e.g. ``safety``; at most 16, stored deduplicated and sorted). Judgements on different
criteria are different judgements: they are never merged, paired or counted as disagreement.

A derived pair is a :class:`Judgement`: one annotator's vote on one unordered pair of
completions of one prompt. Judgements are stored in a canonical orientation (``first`` sorts
before ``second``) so votes on the same pair group together whichever way round they came.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Literal, TypeAlias

import orjson

from plaudit.services.common.errors import InvalidArgumentError
from plaudit.services.common.names import MAX_TAGS as MAX_TAGS
from plaudit.services.common.names import NAME_RE, check_tags, is_name

FeedbackKind = Literal["comparison", "ranking", "rating", "correction"]
FEEDBACK_KINDS: tuple[FeedbackKind, ...] = ("comparison", "ranking", "rating", "correction")

CURSOR_INDEX_BITS = 20
"""Low bits of an export cursor: the index of an item among those one feedback row implies."""
MAX_ITEMS_PER_FEEDBACK = 1 << CURSOR_INDEX_BITS

MAX_PAIRS_PER_RATING = 8
"""Default number of earlier ratings one rating is paired with (see :func:`derive_judgements`).

A group of at most this many + 1 rated completions pairs every completion with every other."""
MAX_RATING_PAIRS_PER_GROUP = 10_000
"""Default cap on the judgements the ratings of one (prompt, annotator, scale) group imply."""

DEFAULT_CRITERION = "overall"
"""The criterion of an event that names none (and of every event stored before criteria)."""
NAME_PATTERN = NAME_RE
"""A criterion or a prompt tag (:mod:`plaudit.services.common.names`; fullmatch)."""
CRITERION_QUESTIONS: dict[str, str] = {
    "overall": "Which response is better?",
    "helpfulness": "Which response is more helpful?",
    "safety": "Which response is safer?",
    "harmlessness": "Which response is more harmless?",
    "honesty": "Which response is more honest?",
}
"""The labelling page's question of the built-in criteria (others: :func:`criterion_question`)."""


def criterion_question(criterion: str) -> str:
    """The question the labelling page asks of ``criterion``."""
    return CRITERION_QUESTIONS.get(criterion, f"Which response is better for {criterion}?")


def check_criteria_names(criteria: Iterable[str]) -> tuple[str, ...]:
    """Configured criteria, deduplicated in order; ValueError names a bad one (start-up check).

    ``overall`` is always accepted, so it is left in only where it is configured."""
    out: dict[str, None] = {}
    for name in criteria:
        if not is_name(name):
            raise ValueError(
                f"criterion {name!r} must match {NAME_PATTERN.pattern} (lower-case ASCII letters, "
                "digits, '_' or '-', starting with a letter, at most 32 characters)"
            )
        out.setdefault(name)
    if not out:
        raise ValueError("criteria must name at least one criterion")
    return tuple(out)


@dataclass(frozen=True)
class FeedbackLimits:
    """Size limits applied by :func:`validate_event`."""

    max_text_bytes: int = 65536  # UTF-8 bytes of a prompt or completion
    min_completions: int = 2
    max_completions: int = 16
    max_id_chars: int = 128  # annotator_id and idempotency_key
    max_metadata_entries: int = 32
    max_metadata_key_chars: int = 64
    max_metadata_value_chars: int = 1024
    criteria: tuple[str, ...] = (DEFAULT_CRITERION,)  # accepted besides "overall" (always)

    def __post_init__(self) -> None:
        object.__setattr__(self, "criteria", check_criteria_names(self.criteria))
        if not 2 <= self.min_completions <= self.max_completions:
            raise ValueError("need 2 <= min_completions <= max_completions")
        if self.max_completions * (self.max_completions - 1) // 2 >= MAX_ITEMS_PER_FEEDBACK:
            raise ValueError("max_completions implies more pairs than an export cursor can address")

    @property
    def accepted_criteria(self) -> tuple[str, ...]:
        """Every criterion an event may name: ``overall`` first, then the configured ones."""
        return tuple(dict.fromkeys((DEFAULT_CRITERION, *self.criteria)))


DEFAULT_LIMITS = FeedbackLimits()


# -- events ------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Comparison:
    """``chosen`` is preferred over ``rejected``; ``margin`` (>= 0) says by how much, if known."""

    kind: ClassVar[FeedbackKind] = "comparison"
    prompt: str
    chosen: str
    rejected: str
    annotator_id: str
    idempotency_key: str
    margin: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    criterion: str = DEFAULT_CRITERION
    tags: Sequence[str] = ()


@dataclass(frozen=True, kw_only=True)
class Ranking:
    """``completions`` ordered best first (2..16 distinct texts); implies every pair."""

    kind: ClassVar[FeedbackKind] = "ranking"
    prompt: str
    completions: Sequence[str]
    annotator_id: str
    idempotency_key: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    criterion: str = DEFAULT_CRITERION
    tags: Sequence[str] = ()


@dataclass(frozen=True, kw_only=True)
class Rating:
    """``score`` on the declared scale ``[scale_min, scale_max]``."""

    kind: ClassVar[FeedbackKind] = "rating"
    prompt: str
    completion: str
    score: float
    scale_min: float
    scale_max: float
    annotator_id: str
    idempotency_key: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    criterion: str = DEFAULT_CRITERION
    tags: Sequence[str] = ()

    @classmethod
    def thumbs(
        cls,
        *,
        prompt: str,
        completion: str,
        up: bool,
        annotator_id: str,
        idempotency_key: str,
        metadata: Mapping[str, str] | None = None,
        criterion: str = DEFAULT_CRITERION,
        tags: Sequence[str] = (),
    ) -> Rating:
        """Thumbs up/down: a rating of 1 or 0 on the 0..1 scale."""
        return cls(
            prompt=prompt,
            completion=completion,
            score=1.0 if up else 0.0,
            scale_min=0.0,
            scale_max=1.0,
            annotator_id=annotator_id,
            idempotency_key=idempotency_key,
            metadata=metadata or {},
            criterion=criterion,
            tags=tags,
        )

    @property
    def normalized_score(self) -> float:
        """The score mapped to 0..1 along its scale."""
        return (self.score - self.scale_min) / (self.scale_max - self.scale_min)

    @property
    def is_positive(self) -> bool:
        """KTO label: True when the score is above the scale midpoint (the midpoint is False)."""
        return self.normalized_score > 0.5


@dataclass(frozen=True, kw_only=True)
class Correction:
    """``corrected`` is the annotator's edit of ``completion``; it is preferred over it."""

    kind: ClassVar[FeedbackKind] = "correction"
    prompt: str
    completion: str
    corrected: str
    annotator_id: str
    idempotency_key: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    criterion: str = DEFAULT_CRITERION
    tags: Sequence[str] = ()


FeedbackEvent: TypeAlias = Comparison | Ranking | Rating | Correction
EVENT_CLASSES: dict[str, type[FeedbackEvent]] = {
    cls.kind: cls for cls in (Comparison, Ranking, Rating, Correction)
}


@dataclass(frozen=True)
class StoredFeedback:
    """An event as committed, with the id the store gave it (ids follow commit order)."""

    feedback_id: int
    event: FeedbackEvent


@dataclass(frozen=True)
class SubmitResult:
    """Acknowledgement of one event: it is committed under ``feedback_id``.

    ``duplicate`` is True when the idempotency key was already stored with the same content, so
    nothing new was written and ``feedback_id`` is the original one.
    """

    feedback_id: int
    duplicate: bool


# -- validation --------------------------------------------------------------------------------
def _string_problem(
    value: object,
    *,
    max_bytes: int | None = None,
    max_chars: int | None = None,
    blank_ok: bool = False,
) -> str | None:
    """What is wrong with a text (type, blank, length, NUL, lone surrogate), or None."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not blank_ok and not value.strip():
        return "must not be empty or whitespace only"
    if max_chars is not None and len(value) > max_chars:
        return f"is {len(value)} characters; the limit is {max_chars}"
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8 text (lone surrogate)"
    if max_bytes is not None and size > max_bytes:
        return f"is {size} UTF-8 bytes; the limit is {max_bytes}"
    return None


def _check_text(name: str, value: object, limits: FeedbackLimits) -> None:
    """A prompt or completion: non-blank, at most ``max_text_bytes`` UTF-8 bytes."""
    if problem := _string_problem(value, max_bytes=limits.max_text_bytes):
        raise InvalidArgumentError(name, problem)


def _check_identifier(name: str, value: object, limits: FeedbackLimits) -> None:
    """An id (annotator, key, source): non-blank, at most ``max_id_chars`` characters."""
    if problem := _string_problem(value, max_chars=limits.max_id_chars):
        raise InvalidArgumentError(name, problem)


def _check_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(name, f"must be a number, got {type(value).__name__}")
    try:
        number = float(value)  # a JSON integer may be too large for a float
    except OverflowError:
        raise InvalidArgumentError(name, "is too large for a 64-bit float") from None
    if not math.isfinite(number):
        raise InvalidArgumentError(name, f"must be a finite number, got {number}")
    return number


def _check_metadata(metadata: object, limits: FeedbackLimits) -> None:
    if not isinstance(metadata, Mapping):
        raise InvalidArgumentError("metadata", "must be a map of strings to strings")
    if len(metadata) > limits.max_metadata_entries:
        raise InvalidArgumentError(
            "metadata", f"has {len(metadata)} entries; the limit is {limits.max_metadata_entries}"
        )
    for key, value in metadata.items():
        shown = repr(key[:32] + ("..." if len(key) > 32 else "")) if isinstance(key, str) else "?"
        if problem := _string_problem(key, max_chars=limits.max_metadata_key_chars):
            raise InvalidArgumentError("metadata", f"key {shown} {problem}")
        limit = limits.max_metadata_value_chars  # values may be empty
        if problem := _string_problem(value, max_chars=limit, blank_ok=True):
            raise InvalidArgumentError("metadata", f"value of {shown} {problem}")


def _check_criterion(value: object, limits: FeedbackLimits) -> None:
    """Empty means ``overall``; otherwise a name among ``limits.accepted_criteria``."""
    accepted = ", ".join(limits.accepted_criteria)
    if not isinstance(value, str):
        raise InvalidArgumentError("criterion", f"must be a string, got {type(value).__name__}")
    if value and not is_name(value):
        raise InvalidArgumentError(
            "criterion",
            f"{value[:40]!r} is not a criterion name ({NAME_PATTERN.pattern}); "
            f"accepted: {accepted}",
        )
    if value and value not in limits.accepted_criteria:
        raise InvalidArgumentError(
            "criterion", f"{value!r} is not a configured criterion; accepted: {accepted}"
        )


def _check_tags(tags: object) -> None:
    """A list of names, at most ``MAX_TAGS`` distinct ones."""
    check_tags("tags", tags)


def normalize_event(event: FeedbackEvent) -> FeedbackEvent:
    """The event as stored: an empty criterion is ``overall``, tags deduplicated and sorted.

    Call it after :func:`validate_event` (whose errors index ``tags`` as given)."""
    criterion = event.criterion or DEFAULT_CRITERION
    tags = tuple(sorted(set(event.tags)))
    if criterion == event.criterion and tuple(event.tags) == tags:
        return event
    return replace(event, criterion=criterion, tags=tags)


def _same_text(a: str, b: str) -> bool:
    """Texts that differ only in surrounding whitespace count as the same completion."""
    return a == b or a.strip() == b.strip()


def validate_event(event: FeedbackEvent, limits: FeedbackLimits = DEFAULT_LIMITS) -> None:
    """Raise :class:`InvalidArgumentError` naming the first offending field and its limit."""
    _check_text("prompt", event.prompt, limits)
    if isinstance(event, Comparison):
        _check_text("chosen", event.chosen, limits)
        _check_text("rejected", event.rejected, limits)
        if _same_text(event.chosen, event.rejected):
            raise InvalidArgumentError("rejected", "must differ from chosen")
        if event.margin is not None:
            margin = _check_finite("margin", event.margin)
            if margin < 0:
                raise InvalidArgumentError("margin", f"must be >= 0, got {margin}")
    elif isinstance(event, Ranking):
        _validate_completions(event.completions, limits)
    elif isinstance(event, Rating):
        _check_text("completion", event.completion, limits)
        low = _check_finite("scale_min", event.scale_min)
        high = _check_finite("scale_max", event.scale_max)
        if low >= high:
            raise InvalidArgumentError(
                "scale_min", f"must be less than scale_max ({low} >= {high})"
            )
        if not math.isfinite(high - low):  # margins and normalised scores divide by it
            raise InvalidArgumentError(
                "scale_max", f"the scale [{low}, {high}] is too wide: its width overflows"
            )
        score = _check_finite("score", event.score)
        if not low <= score <= high:
            raise InvalidArgumentError(
                "score", f"must lie within the scale [{low}, {high}], got {score}"
            )
    elif isinstance(event, Correction):
        _check_text("completion", event.completion, limits)
        _check_text("corrected", event.corrected, limits)
        if _same_text(event.completion, event.corrected):
            raise InvalidArgumentError("corrected", "must differ from completion")
    else:  # pragma: no cover - guarded by the type checker
        raise InvalidArgumentError("kind", f"unknown feedback type {type(event).__name__}")
    _check_identifier("annotator_id", event.annotator_id, limits)
    _check_identifier("idempotency_key", event.idempotency_key, limits)
    _check_metadata(event.metadata, limits)
    _check_criterion(event.criterion, limits)
    _check_tags(event.tags)


def _validate_completions(
    completions: object, limits: FeedbackLimits, what: str = "a ranking"
) -> None:
    if isinstance(completions, str) or not isinstance(completions, Sequence):
        raise InvalidArgumentError("completions", "must be a list of strings")
    count = len(completions)
    if not limits.min_completions <= count <= limits.max_completions:
        raise InvalidArgumentError(
            "completions",
            f"has {count} entries; {what} needs {limits.min_completions} to "
            f"{limits.max_completions}",
        )
    seen: dict[str, int] = {}
    for index, text in enumerate(completions):
        name = f"completions[{index}]"
        _check_text(name, text, limits)
        key = text.strip()
        if key in seen:
            raise InvalidArgumentError(name, f"duplicates completions[{seen[key]}]")
        seen[key] = index


def validate_identifier(name: str, value: object, limits: FeedbackLimits = DEFAULT_LIMITS) -> None:
    """Raise :class:`InvalidArgumentError` unless ``value`` is a usable id (annotator, key)."""
    _check_identifier(name, value, limits)


# -- labelling tasks ---------------------------------------------------------------------------
MAX_TASK_SOURCE_CHARS = 32


@dataclass(frozen=True, kw_only=True)
class NewTask:
    """A prompt and 2..16 candidate completions to be labelled, before it is queued.

    ``key`` identifies the task across imports (importing the same key again adds nothing); by
    default it is :func:`task_key` of the content. ``source`` names where it came from.
    """

    prompt: str
    completions: Sequence[str]
    key: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    source: str = "import"

    @property
    def resolved_key(self) -> str:
        return self.key if self.key is not None else task_key(self.prompt, self.completions)


@dataclass(frozen=True)
class LabellingTask:
    """A queued task: ``labels`` counts the annotators who have labelled it."""

    task_id: int
    key: str
    prompt: str
    completions: tuple[str, ...]
    metadata: Mapping[str, str]
    source: str
    labels: int


def task_key(prompt: str, completions: Iterable[str]) -> str:
    """The default key of a task: a hash of its prompt and its set of completions."""
    body = orjson.dumps([prompt, sorted(completions)])
    return "sha256:" + hashlib.sha256(body).hexdigest()


def validate_task(task: NewTask, limits: FeedbackLimits = DEFAULT_LIMITS) -> None:
    """Raise :class:`InvalidArgumentError` naming the first offending field of a new task."""
    _check_text("prompt", task.prompt, limits)
    _validate_completions(task.completions, limits, what="a task")
    if task.key is not None:
        _check_identifier("key", task.key, limits)
    _check_metadata(task.metadata, limits)
    _check_identifier("source", task.source, limits)
    if len(task.source) > MAX_TASK_SOURCE_CHARS:
        raise InvalidArgumentError(
            "source", f"is {len(task.source)} characters; the limit is {MAX_TASK_SOURCE_CHARS}"
        )


# -- canonical form ----------------------------------------------------------------------------
_COMMON_FIELDS = frozenset(
    {"prompt", "annotator_id", "idempotency_key", "metadata", "criterion", "tags"}
)


def event_payload(event: FeedbackEvent) -> dict[str, Any]:
    """The kind-specific fields of an event as JSON-ready values (numbers as floats)."""
    payload: dict[str, Any] = {}
    for name in (f.name for f in fields(event) if f.name not in _COMMON_FIELDS):
        value = getattr(event, name)
        payload[name] = list(value) if name == "completions" else value
        if isinstance(value, int | float):
            payload[name] = float(value)
    return payload


def event_from_payload(
    kind: str,
    *,
    prompt: str,
    annotator_id: str,
    idempotency_key: str,
    payload: Mapping[str, Any],
    metadata: Mapping[str, str],
    criterion: str | None = DEFAULT_CRITERION,
    tags: Sequence[str] | None = (),
) -> FeedbackEvent:
    """Rebuild an event from its stored columns (inverse of :func:`event_payload`); a NULL
    criterion or tags column (never written, but tolerated) reads as ``overall``, no tags."""
    if kind not in EVENT_CLASSES:
        raise ValueError(f"unknown feedback kind {kind!r}")
    values = dict(payload)
    if "completions" in values:
        values["completions"] = tuple(values["completions"])
    common: dict[str, Any] = {"prompt": prompt, "annotator_id": annotator_id}
    common["idempotency_key"] = idempotency_key
    common["criterion"] = criterion or DEFAULT_CRITERION
    common["tags"] = tuple(tags or ())
    return EVENT_CLASSES[kind](**common, **values, metadata=dict(metadata))


def content_hash(event: FeedbackEvent) -> str:
    """sha256 of everything the event says except its idempotency key (hex).

    Two submissions under one key are the same feedback exactly when their hashes match. The
    criterion counts only when it is not ``overall`` and the tags only when there are any, so
    an event stored before criteria existed hashes as it did then.
    """
    body: dict[str, Any] = {
        "kind": event.kind,
        "prompt": event.prompt,
        "annotator_id": event.annotator_id,
        "metadata": dict(event.metadata),
        "payload": event_payload(event),
    }
    if event.criterion and event.criterion != DEFAULT_CRITERION:
        body["criterion"] = event.criterion
    if event.tags:
        body["tags"] = sorted(set(event.tags))
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def text_hash(text: str) -> str:
    """sha256 of a text (hex); the store indexes prompts by it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- judgements --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Judgement:
    """One annotator's vote on the unordered pair {first, second} of completions of a prompt.

    ``preference`` is +1 when ``first`` is preferred, -1 when ``second`` is, 0 for no preference
    (two equal ratings: it records that the annotator no longer prefers either and yields no
    pair). ``first < second`` always. ``position`` (feedback id, index among the judgements that
    feedback implies) orders judgements in commit order and is the basis of export cursors.
    ``criterion`` is what was judged (votes on different criteria never group together);
    ``tags`` are the prompt tags of the event it came from.
    """

    prompt: str
    first: str
    second: str
    preference: int
    margin: float | None
    annotator_id: str
    source_kind: FeedbackKind
    feedback_id: int
    index: int
    criterion: str = DEFAULT_CRITERION
    tags: tuple[str, ...] = ()

    @property
    def position(self) -> tuple[int, int]:
        return (self.feedback_id, self.index)

    @property
    def chosen(self) -> str:
        return self.second if self.preference < 0 else self.first

    @property
    def rejected(self) -> str:
        return self.first if self.preference < 0 else self.second


def make_judgement(
    prompt: str,
    preferred: str,
    other: str,
    *,
    margin: float | None,
    annotator_id: str,
    source_kind: FeedbackKind,
    feedback_id: int,
    index: int,
    tie: bool = False,
    criterion: str = DEFAULT_CRITERION,
    tags: Sequence[str] = (),
) -> Judgement:
    """A judgement that ``preferred`` beats ``other`` (or neither, with ``tie``), canonicalised."""
    if preferred < other:
        first, second, preference = preferred, other, 1
    else:
        first, second, preference = other, preferred, -1
    return Judgement(
        prompt=prompt,
        first=first,
        second=second,
        preference=0 if tie else preference,
        margin=margin,
        annotator_id=annotator_id,
        source_kind=source_kind,
        feedback_id=feedback_id,
        index=index,
        criterion=criterion or DEFAULT_CRITERION,
        tags=tuple(tags),
    )


def ranking_pairs(completions: Sequence[str]) -> list[tuple[str, str]]:
    """Every (better, worse) pair a best-first ranking implies: K(K-1)/2 of them, in order."""
    return [
        (completions[i], completions[j])
        for i in range(len(completions))
        for j in range(i + 1, len(completions))
    ]


def rating_margin(better: Rating, worse: Rating) -> float:
    """The score gap as a fraction of the (shared) scale width."""
    return (better.score - worse.score) / (better.scale_max - better.scale_min)


@dataclass(slots=True)
class _RatingGroup:
    """Ratings of one (prompt, rater, scale): the latest rating of each completion, by score."""

    latest: dict[str, tuple[Rating, tuple[float, int, str]]] = field(default_factory=dict)
    by_score: list[tuple[float, int, str]] = field(default_factory=list)  # (score, fid, text)
    emitted: int = 0

    def partners(self, event: Rating, limit: int) -> list[Rating]:
        """The earlier ratings ``event`` is paired with (its own completion excluded).

        With at most ``limit`` other completions: all of them, in order of their latest rating
        (ties included). Otherwise ``limit`` of them with a *different* score: the nearest
        scores below and above (half each; the other side fills a short side; within one score
        the nearer end of the score order first), returned in commit order. Cost
        O(limit + log n) per rating plus the list insertion, not O(n) pairs.
        """
        own = self.latest.get(event.completion)
        others = len(self.latest) - (own is not None)
        if others <= limit:
            return [r for c, (r, _) in self.latest.items() if c != event.completion]
        score = float(event.score)
        order = self.by_score
        below: list[tuple[float, int, str]] = []
        i = bisect.bisect_left(order, (score, -math.inf, "")) - 1
        while i >= 0 and len(below) < limit:
            if order[i][2] != event.completion:
                below.append(order[i])
            i -= 1
        above: list[tuple[float, int, str]] = []
        i = bisect.bisect_right(order, (score, math.inf, ""))
        while i < len(order) and len(above) < limit:
            if order[i][2] != event.completion:
                above.append(order[i])
            i += 1
        n_above = min(len(above), limit - min(len(below), limit // 2))
        chosen = below[: limit - n_above] + above[:n_above]
        return [self.latest[c][0] for _, _, c in sorted(chosen, key=lambda e: e[1])]

    def record(self, event: Rating, feedback_id: int) -> None:
        """Make ``event`` the latest rating of its completion."""
        previous = self.latest.pop(event.completion, None)  # keep the dict in commit order
        if previous is not None:
            del self.by_score[bisect.bisect_left(self.by_score, previous[1])]
        entry = (float(event.score), feedback_id, event.completion)
        bisect.insort(self.by_score, entry)
        self.latest[event.completion] = (event, entry)


def derive_judgements(
    records: Iterable[StoredFeedback],
    *,
    rating_pairs_across_annotators: bool = False,
    max_pairs_per_rating: int = MAX_PAIRS_PER_RATING,
    max_rating_pairs_per_group: int = MAX_RATING_PAIRS_PER_GROUP,
) -> list[Judgement]:
    """Every judgement the records imply, in position order. Deterministic.

    Records are processed in feedback id (commit) order. A rating is paired with the latest
    earlier rating of other completions of the same prompt and criterion on the same scale
    (``scale_min``/``scale_max`` equal), by the same annotator unless
    ``rating_pairs_across_annotators`` (then the judgement is attributed to the later rating's
    annotator). Equal scores give a ``preference == 0`` judgement. Completions are matched
    exactly (the store cannot know two texts are the same answer otherwise).

    Ratings are bounded so their cost is linear, not quadratic (security.md, "Rating pairs"):
    while a group has at most ``max_pairs_per_rating`` other rated completions a rating is paired
    with each of them (every pair); beyond that with ``max_pairs_per_rating`` of them whose score
    differs, the nearest scores below and above (see :meth:`_RatingGroup.partners`), so ranks
    stay connected through neighbouring scores. A group (prompt, rater, scale) implies at most
    ``max_rating_pairs_per_group`` judgements; later ratings in it imply none (they remain
    unpaired examples).
    """
    if max_pairs_per_rating < 1 or max_rating_pairs_per_group < 0:
        raise ValueError("need max_pairs_per_rating >= 1 and max_rating_pairs_per_group >= 0")
    limit = min(max_pairs_per_rating, MAX_ITEMS_PER_FEEDBACK)
    judgements: list[Judgement] = []
    groups: dict[tuple[str, str, str, float, float], _RatingGroup] = {}
    for record in sorted(records, key=lambda r: r.feedback_id):
        event, fid = record.event, record.feedback_id
        criterion = event.criterion or DEFAULT_CRITERION
        common: dict[str, Any] = {
            "annotator_id": event.annotator_id,
            "source_kind": event.kind,
            "feedback_id": fid,
            "criterion": criterion,
            "tags": tuple(event.tags),
        }
        if isinstance(event, Comparison):
            judgements.append(
                make_judgement(
                    event.prompt,
                    event.chosen,
                    event.rejected,
                    margin=event.margin,
                    index=0,
                    **common,
                )
            )
        elif isinstance(event, Ranking):
            for index, (better, worse) in enumerate(ranking_pairs(event.completions)):
                judgements.append(
                    make_judgement(event.prompt, better, worse, margin=None, index=index, **common)
                )
        elif isinstance(event, Correction):
            judgements.append(
                make_judgement(
                    event.prompt, event.corrected, event.completion, margin=None, index=0, **common
                )
            )
        else:
            rater = "" if rating_pairs_across_annotators else event.annotator_id
            key = (event.prompt, criterion, rater, float(event.scale_min), float(event.scale_max))
            group = groups.setdefault(key, _RatingGroup())
            budget = min(limit, max_rating_pairs_per_group - group.emitted)
            partners = group.partners(event, budget) if budget > 0 else []
            for index, previous in enumerate(partners):
                high, low = (
                    (event, previous) if event.score >= previous.score else (previous, event)
                )
                judgements.append(
                    make_judgement(
                        event.prompt,
                        high.completion,
                        low.completion,
                        margin=rating_margin(high, low),
                        index=index,
                        tie=event.score == previous.score,
                        **common,
                    )
                )
            group.emitted += len(partners)
            group.record(event, fid)
    return judgements


# -- exported examples -------------------------------------------------------------------------
@dataclass(frozen=True)
class DerivedPair:
    """One training pair: the consensus of every vote on one unordered pair of completions.

    ``weight`` is the majority share of the votes (see :mod:`plaudit.services.feedback.quality`);
    ``agree``/``disagree`` count the annotators on each side. ``annotator_id``, ``source_kind``
    and ``feedback_id`` name the latest vote on the majority side. ``pair_key`` identifies the
    (prompt, unordered pair, criterion) so a reader can replace a pair that is exported again
    with new votes. Pass ``cursor`` as ``after_cursor`` to resume after this item.
    ``criterion`` is what the votes judged; ``tags`` is the union of the prompt tags of every
    event that voted on the pair (sorted), so a tag given once stays with the pair.
    """

    prompt: str
    chosen: str
    rejected: str
    margin: float | None
    weight: float
    annotator_id: str
    source_kind: FeedbackKind
    feedback_id: int
    cursor: int
    agree: int
    disagree: int
    pair_key: str
    criterion: str = DEFAULT_CRITERION
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class UnpairedExample:
    """A rating as a KTO example: ``label`` is True when the score is above the scale midpoint."""

    prompt: str
    completion: str
    label: bool
    score: float
    normalized_score: float
    annotator_id: str
    feedback_id: int
    cursor: int
    criterion: str = DEFAULT_CRITERION
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class SftExample:
    """A correction as a supervised example: ``completion`` is the corrected text."""

    prompt: str
    completion: str
    annotator_id: str
    feedback_id: int
    cursor: int
    criterion: str = DEFAULT_CRITERION
    tags: tuple[str, ...] = ()


def encode_cursor(feedback_id: int, index: int = 0) -> int:
    """Export cursor of the ``index``-th item implied by feedback ``feedback_id``."""
    return (feedback_id << CURSOR_INDEX_BITS) | index


def decode_cursor(cursor: int) -> tuple[int, int]:
    """(feedback id, item index) of a cursor; 0 is before everything."""
    return cursor >> CURSOR_INDEX_BITS, cursor & (MAX_ITEMS_PER_FEEDBACK - 1)

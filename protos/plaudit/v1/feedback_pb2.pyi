from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeedbackKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEEDBACK_KIND_UNSPECIFIED: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_COMPARISON: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_RANKING: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_RATING: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_CORRECTION: _ClassVar[FeedbackKind]
FEEDBACK_KIND_UNSPECIFIED: FeedbackKind
FEEDBACK_KIND_COMPARISON: FeedbackKind
FEEDBACK_KIND_RANKING: FeedbackKind
FEEDBACK_KIND_RATING: FeedbackKind
FEEDBACK_KIND_CORRECTION: FeedbackKind

class SubmitComparisonRequest(_message.Message):
    __slots__ = ("prompt", "chosen", "rejected", "annotator_id", "idempotency_key", "margin", "metadata", "criterion", "tags")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chosen: str
    rejected: str
    annotator_id: str
    idempotency_key: str
    margin: float
    metadata: _containers.ScalarMap[str, str]
    criterion: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., chosen: _Optional[str] = ..., rejected: _Optional[str] = ..., annotator_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., margin: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., criterion: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class SubmitComparisonResponse(_message.Message):
    __slots__ = ("feedback_id", "duplicate")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    feedback_id: str
    duplicate: bool
    def __init__(self, feedback_id: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class SubmitRankingRequest(_message.Message):
    __slots__ = ("prompt", "completions", "annotator_id", "idempotency_key", "metadata", "criterion", "tags")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    completions: _containers.RepeatedScalarFieldContainer[str]
    annotator_id: str
    idempotency_key: str
    metadata: _containers.ScalarMap[str, str]
    criterion: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., completions: _Optional[_Iterable[str]] = ..., annotator_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., criterion: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class SubmitRankingResponse(_message.Message):
    __slots__ = ("feedback_id", "duplicate")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    feedback_id: str
    duplicate: bool
    def __init__(self, feedback_id: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class SubmitRatingRequest(_message.Message):
    __slots__ = ("prompt", "completion", "score", "scale_min", "scale_max", "annotator_id", "idempotency_key", "metadata", "criterion", "tags")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SCALE_MIN_FIELD_NUMBER: _ClassVar[int]
    SCALE_MAX_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    completion: str
    score: float
    scale_min: float
    scale_max: float
    annotator_id: str
    idempotency_key: str
    metadata: _containers.ScalarMap[str, str]
    criterion: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., completion: _Optional[str] = ..., score: _Optional[float] = ..., scale_min: _Optional[float] = ..., scale_max: _Optional[float] = ..., annotator_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., criterion: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class SubmitRatingResponse(_message.Message):
    __slots__ = ("feedback_id", "duplicate")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    feedback_id: str
    duplicate: bool
    def __init__(self, feedback_id: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class SubmitCorrectionRequest(_message.Message):
    __slots__ = ("prompt", "completion", "corrected", "annotator_id", "idempotency_key", "metadata", "criterion", "tags")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    CORRECTED_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    completion: str
    corrected: str
    annotator_id: str
    idempotency_key: str
    metadata: _containers.ScalarMap[str, str]
    criterion: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., completion: _Optional[str] = ..., corrected: _Optional[str] = ..., annotator_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., criterion: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class SubmitCorrectionResponse(_message.Message):
    __slots__ = ("feedback_id", "duplicate")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    feedback_id: str
    duplicate: bool
    def __init__(self, feedback_id: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class SubmitBatchRequest(_message.Message):
    __slots__ = ("comparison", "ranking", "rating", "correction")
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_FIELD_NUMBER: _ClassVar[int]
    comparison: SubmitComparisonRequest
    ranking: SubmitRankingRequest
    rating: SubmitRatingRequest
    correction: SubmitCorrectionRequest
    def __init__(self, comparison: _Optional[_Union[SubmitComparisonRequest, _Mapping]] = ..., ranking: _Optional[_Union[SubmitRankingRequest, _Mapping]] = ..., rating: _Optional[_Union[SubmitRatingRequest, _Mapping]] = ..., correction: _Optional[_Union[SubmitCorrectionRequest, _Mapping]] = ...) -> None: ...

class EventResult(_message.Message):
    __slots__ = ("index", "feedback_id", "duplicate", "code", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    feedback_id: str
    duplicate: bool
    code: int
    error: str
    def __init__(self, index: _Optional[int] = ..., feedback_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., code: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class SubmitBatchResponse(_message.Message):
    __slots__ = ("results", "accepted", "rejected")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EventResult]
    accepted: int
    rejected: int
    def __init__(self, results: _Optional[_Iterable[_Union[EventResult, _Mapping]]] = ..., accepted: _Optional[int] = ..., rejected: _Optional[int] = ...) -> None: ...

class ExportPreferencesRequest(_message.Message):
    __slots__ = ("cursor", "limit", "exclude_outliers", "page_size", "criterion")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_OUTLIERS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    cursor: str
    limit: int
    exclude_outliers: bool
    page_size: int
    criterion: str
    def __init__(self, cursor: _Optional[str] = ..., limit: _Optional[int] = ..., exclude_outliers: _Optional[bool] = ..., page_size: _Optional[int] = ..., criterion: _Optional[str] = ...) -> None: ...

class PreferencePair(_message.Message):
    __slots__ = ("prompt", "chosen", "rejected", "margin", "weight", "annotator_id", "source_kind", "feedback_id", "cursor", "agree", "disagree", "pair_key", "criterion", "tags")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_KIND_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    AGREE_FIELD_NUMBER: _ClassVar[int]
    DISAGREE_FIELD_NUMBER: _ClassVar[int]
    PAIR_KEY_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chosen: str
    rejected: str
    margin: float
    weight: float
    annotator_id: str
    source_kind: FeedbackKind
    feedback_id: str
    cursor: str
    agree: int
    disagree: int
    pair_key: str
    criterion: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., chosen: _Optional[str] = ..., rejected: _Optional[str] = ..., margin: _Optional[float] = ..., weight: _Optional[float] = ..., annotator_id: _Optional[str] = ..., source_kind: _Optional[_Union[FeedbackKind, str]] = ..., feedback_id: _Optional[str] = ..., cursor: _Optional[str] = ..., agree: _Optional[int] = ..., disagree: _Optional[int] = ..., pair_key: _Optional[str] = ..., criterion: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class ExportPreferencesResponse(_message.Message):
    __slots__ = ("pairs", "next_cursor")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[PreferencePair]
    next_cursor: str
    def __init__(self, pairs: _Optional[_Iterable[_Union[PreferencePair, _Mapping]]] = ..., next_cursor: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AnnotatorStats(_message.Message):
    __slots__ = ("annotator_id", "records", "compared_votes", "disagreement_rate", "p_value", "outlier")
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    COMPARED_VOTES_FIELD_NUMBER: _ClassVar[int]
    DISAGREEMENT_RATE_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_FIELD_NUMBER: _ClassVar[int]
    annotator_id: str
    records: int
    compared_votes: int
    disagreement_rate: float
    p_value: float
    outlier: bool
    def __init__(self, annotator_id: _Optional[str] = ..., records: _Optional[int] = ..., compared_votes: _Optional[int] = ..., disagreement_rate: _Optional[float] = ..., p_value: _Optional[float] = ..., outlier: _Optional[bool] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("records", "records_by_kind", "annotators", "judgements", "pairs_derived", "overlapping_items", "raw_agreement", "kappa", "kappa_method", "contradictions", "ties", "criteria")
    class RecordsByKindEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_BY_KIND_FIELD_NUMBER: _ClassVar[int]
    ANNOTATORS_FIELD_NUMBER: _ClassVar[int]
    JUDGEMENTS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_DERIVED_FIELD_NUMBER: _ClassVar[int]
    OVERLAPPING_ITEMS_FIELD_NUMBER: _ClassVar[int]
    RAW_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    KAPPA_FIELD_NUMBER: _ClassVar[int]
    KAPPA_METHOD_FIELD_NUMBER: _ClassVar[int]
    CONTRADICTIONS_FIELD_NUMBER: _ClassVar[int]
    TIES_FIELD_NUMBER: _ClassVar[int]
    CRITERIA_FIELD_NUMBER: _ClassVar[int]
    records: int
    records_by_kind: _containers.ScalarMap[str, int]
    annotators: _containers.RepeatedCompositeFieldContainer[AnnotatorStats]
    judgements: int
    pairs_derived: int
    overlapping_items: int
    raw_agreement: float
    kappa: float
    kappa_method: str
    contradictions: int
    ties: int
    criteria: _containers.RepeatedCompositeFieldContainer[CriterionStats]
    def __init__(self, records: _Optional[int] = ..., records_by_kind: _Optional[_Mapping[str, int]] = ..., annotators: _Optional[_Iterable[_Union[AnnotatorStats, _Mapping]]] = ..., judgements: _Optional[int] = ..., pairs_derived: _Optional[int] = ..., overlapping_items: _Optional[int] = ..., raw_agreement: _Optional[float] = ..., kappa: _Optional[float] = ..., kappa_method: _Optional[str] = ..., contradictions: _Optional[int] = ..., ties: _Optional[int] = ..., criteria: _Optional[_Iterable[_Union[CriterionStats, _Mapping]]] = ...) -> None: ...

class CriterionStats(_message.Message):
    __slots__ = ("criterion", "records", "judgements", "pairs_derived", "overlapping_items", "raw_agreement", "kappa", "kappa_method", "contradictions", "ties")
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    JUDGEMENTS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_DERIVED_FIELD_NUMBER: _ClassVar[int]
    OVERLAPPING_ITEMS_FIELD_NUMBER: _ClassVar[int]
    RAW_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    KAPPA_FIELD_NUMBER: _ClassVar[int]
    KAPPA_METHOD_FIELD_NUMBER: _ClassVar[int]
    CONTRADICTIONS_FIELD_NUMBER: _ClassVar[int]
    TIES_FIELD_NUMBER: _ClassVar[int]
    criterion: str
    records: int
    judgements: int
    pairs_derived: int
    overlapping_items: int
    raw_agreement: float
    kappa: float
    kappa_method: str
    contradictions: int
    ties: int
    def __init__(self, criterion: _Optional[str] = ..., records: _Optional[int] = ..., judgements: _Optional[int] = ..., pairs_derived: _Optional[int] = ..., overlapping_items: _Optional[int] = ..., raw_agreement: _Optional[float] = ..., kappa: _Optional[float] = ..., kappa_method: _Optional[str] = ..., contradictions: _Optional[int] = ..., ties: _Optional[int] = ...) -> None: ...

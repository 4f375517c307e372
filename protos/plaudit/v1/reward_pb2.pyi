import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Normalization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NORMALIZATION_UNSPECIFIED: _ClassVar[Normalization]
    NORMALIZATION_RAW: _ClassVar[Normalization]
    NORMALIZATION_STANDARDIZED: _ClassVar[Normalization]
NORMALIZATION_UNSPECIFIED: Normalization
NORMALIZATION_RAW: Normalization
NORMALIZATION_STANDARDIZED: Normalization

class ScoreItem(_message.Message):
    __slots__ = ("prompt", "completion", "tags")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    completion: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., completion: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items", "normalization", "model", "objective")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    normalization: Normalization
    model: str
    objective: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ..., normalization: _Optional[_Union[Normalization, str]] = ..., model: _Optional[str] = ..., objective: _Optional[str] = ...) -> None: ...

class ModelRewards(_message.Message):
    __slots__ = ("model", "model_version", "rewards")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: str
    rewards: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[str] = ..., rewards: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("rewards", "model_version", "truncated", "model", "objective", "models", "spread", "ensemble_members", "member_rewards")
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SPREAD_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_REWARDS_FIELD_NUMBER: _ClassVar[int]
    rewards: _containers.RepeatedScalarFieldContainer[float]
    model_version: str
    truncated: _containers.RepeatedScalarFieldContainer[bool]
    model: str
    objective: str
    models: _containers.RepeatedCompositeFieldContainer[ModelRewards]
    spread: _containers.RepeatedScalarFieldContainer[float]
    ensemble_members: int
    member_rewards: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, rewards: _Optional[_Iterable[float]] = ..., model_version: _Optional[str] = ..., truncated: _Optional[_Iterable[bool]] = ..., model: _Optional[str] = ..., objective: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelRewards, _Mapping]]] = ..., spread: _Optional[_Iterable[float]] = ..., ensemble_members: _Optional[int] = ..., member_rewards: _Optional[_Iterable[float]] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("prompt", "completion_a", "completion_b", "normalization", "model", "objective", "tags")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_A_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_B_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    completion_a: str
    completion_b: str
    normalization: Normalization
    model: str
    objective: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., completion_a: _Optional[str] = ..., completion_b: _Optional[str] = ..., normalization: _Optional[_Union[Normalization, str]] = ..., model: _Optional[str] = ..., objective: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("reward_a", "reward_b", "prob_a_preferred", "model_version", "model", "objective", "models", "prob_a_preferred_spread", "members_preferring_a", "ensemble_members")
    REWARD_A_FIELD_NUMBER: _ClassVar[int]
    REWARD_B_FIELD_NUMBER: _ClassVar[int]
    PROB_A_PREFERRED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    PROB_A_PREFERRED_SPREAD_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_PREFERRING_A_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    reward_a: float
    reward_b: float
    prob_a_preferred: float
    model_version: str
    model: str
    objective: str
    models: _containers.RepeatedCompositeFieldContainer[ModelRewards]
    prob_a_preferred_spread: float
    members_preferring_a: float
    ensemble_members: int
    def __init__(self, reward_a: _Optional[float] = ..., reward_b: _Optional[float] = ..., prob_a_preferred: _Optional[float] = ..., model_version: _Optional[str] = ..., model: _Optional[str] = ..., objective: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelRewards, _Mapping]]] = ..., prob_a_preferred_spread: _Optional[float] = ..., members_preferring_a: _Optional[float] = ..., ensemble_members: _Optional[int] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ShadowStatus(_message.Message):
    __slots__ = ("version", "fraction", "requests", "pairs", "agreement", "rankings", "rank_correlation", "live_mean", "live_std", "shadow_mean", "shadow_std", "dropped", "error", "live_version")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    RANKINGS_FIELD_NUMBER: _ClassVar[int]
    RANK_CORRELATION_FIELD_NUMBER: _ClassVar[int]
    LIVE_MEAN_FIELD_NUMBER: _ClassVar[int]
    LIVE_STD_FIELD_NUMBER: _ClassVar[int]
    SHADOW_MEAN_FIELD_NUMBER: _ClassVar[int]
    SHADOW_STD_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    fraction: float
    requests: int
    pairs: int
    agreement: float
    rankings: int
    rank_correlation: float
    live_mean: float
    live_std: float
    shadow_mean: float
    shadow_std: float
    dropped: int
    error: str
    live_version: str
    def __init__(self, version: _Optional[str] = ..., fraction: _Optional[float] = ..., requests: _Optional[int] = ..., pairs: _Optional[int] = ..., agreement: _Optional[float] = ..., rankings: _Optional[int] = ..., rank_correlation: _Optional[float] = ..., live_mean: _Optional[float] = ..., live_std: _Optional[float] = ..., shadow_mean: _Optional[float] = ..., shadow_std: _Optional[float] = ..., dropped: _Optional[int] = ..., error: _Optional[str] = ..., live_version: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("version", "backbone", "execution_provider", "precision", "max_length", "text_format", "normalization_mean", "normalization_std", "loaded_at", "last_swap_error", "calibration_temperature", "calibrated", "heldout_accuracy", "heldout_ece", "heldout_pairs", "data_cursor", "name", "models", "objectives", "shadow", "ensemble_members")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TEXT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_MEAN_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_STD_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SWAP_ERROR_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_ECE_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_PAIRS_FIELD_NUMBER: _ClassVar[int]
    DATA_CURSOR_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVES_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    version: str
    backbone: str
    execution_provider: str
    precision: str
    max_length: int
    text_format: str
    normalization_mean: float
    normalization_std: float
    loaded_at: _timestamp_pb2.Timestamp
    last_swap_error: str
    calibration_temperature: float
    calibrated: bool
    heldout_accuracy: float
    heldout_ece: float
    heldout_pairs: int
    data_cursor: str
    name: str
    models: _containers.RepeatedCompositeFieldContainer[GetModelResponse]
    objectives: _containers.RepeatedScalarFieldContainer[str]
    shadow: ShadowStatus
    ensemble_members: int
    def __init__(self, version: _Optional[str] = ..., backbone: _Optional[str] = ..., execution_provider: _Optional[str] = ..., precision: _Optional[str] = ..., max_length: _Optional[int] = ..., text_format: _Optional[str] = ..., normalization_mean: _Optional[float] = ..., normalization_std: _Optional[float] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_swap_error: _Optional[str] = ..., calibration_temperature: _Optional[float] = ..., calibrated: _Optional[bool] = ..., heldout_accuracy: _Optional[float] = ..., heldout_ece: _Optional[float] = ..., heldout_pairs: _Optional[int] = ..., data_cursor: _Optional[str] = ..., name: _Optional[str] = ..., models: _Optional[_Iterable[_Union[GetModelResponse, _Mapping]]] = ..., objectives: _Optional[_Iterable[str]] = ..., shadow: _Optional[_Union[ShadowStatus, _Mapping]] = ..., ensemble_members: _Optional[int] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReloadModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ReloadModelResponse(_message.Message):
    __slots__ = ("live_version", "promoted_version", "swapped", "last_swap_error", "model", "models", "shadow_version", "shadow_error")
    LIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_FIELD_NUMBER: _ClassVar[int]
    LAST_SWAP_ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_ERROR_FIELD_NUMBER: _ClassVar[int]
    live_version: str
    promoted_version: str
    swapped: bool
    last_swap_error: str
    model: str
    models: _containers.RepeatedCompositeFieldContainer[ReloadModelResponse]
    shadow_version: str
    shadow_error: str
    def __init__(self, live_version: _Optional[str] = ..., promoted_version: _Optional[str] = ..., swapped: _Optional[bool] = ..., last_swap_error: _Optional[str] = ..., model: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ReloadModelResponse, _Mapping]]] = ..., shadow_version: _Optional[str] = ..., shadow_error: _Optional[str] = ...) -> None: ...

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ReloadModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadModelResponse(_message.Message):
    __slots__ = ("live_version", "promoted_version", "swapped", "last_swap_error")
    LIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_FIELD_NUMBER: _ClassVar[int]
    LAST_SWAP_ERROR_FIELD_NUMBER: _ClassVar[int]
    live_version: str
    promoted_version: str
    swapped: bool
    last_swap_error: str
    def __init__(self, live_version: _Optional[str] = ..., promoted_version: _Optional[str] = ..., swapped: _Optional[bool] = ..., last_swap_error: _Optional[str] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_NONE: _ClassVar[Codec]
    CODEC_PNG: _ClassVar[Codec]
    CODEC_JPEG: _ClassVar[Codec]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_SPLIT: _ClassVar[Mode]
    MODE_RAW: _ClassVar[Mode]
DTYPE_UNSPECIFIED: DType
UINT8: DType
FLOAT16: DType
FLOAT32: DType
INT64: DType
INT32: DType
CODEC_NONE: Codec
CODEC_PNG: Codec
CODEC_JPEG: Codec
MODE_SPLIT: Mode
MODE_RAW: Mode

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data", "scale", "zero_point", "codec")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    scale: float
    zero_point: int
    codec: Codec
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ..., scale: _Optional[float] = ..., zero_point: _Optional[int] = ..., codec: _Optional[_Union[Codec, str]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("shape", "dtype", "scale", "zero_point")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINT_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    scale: float
    zero_point: int
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., scale: _Optional[float] = ..., zero_point: _Optional[int] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("bundle_name", "bundle_version", "encoder_digest", "feature_spec", "mode", "client_id")
    BUNDLE_NAME_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENCODER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SPEC_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    bundle_name: str
    bundle_version: str
    encoder_digest: str
    feature_spec: TensorSpec
    mode: Mode
    client_id: str
    def __init__(self, bundle_name: _Optional[str] = ..., bundle_version: _Optional[str] = ..., encoder_digest: _Optional[str] = ..., feature_spec: _Optional[_Union[TensorSpec, _Mapping]] = ..., mode: _Optional[_Union[Mode, str]] = ..., client_id: _Optional[str] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("session_id", "bundle_name", "bundle_version", "encoder_digest", "feature_spec", "observation_spec", "action_spec")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_NAME_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENCODER_DIGEST_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SPEC_FIELD_NUMBER: _ClassVar[int]
    OBSERVATION_SPEC_FIELD_NUMBER: _ClassVar[int]
    ACTION_SPEC_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    bundle_name: str
    bundle_version: str
    encoder_digest: str
    feature_spec: TensorSpec
    observation_spec: TensorSpec
    action_spec: TensorSpec
    def __init__(self, session_id: _Optional[int] = ..., bundle_name: _Optional[str] = ..., bundle_version: _Optional[str] = ..., encoder_digest: _Optional[str] = ..., feature_spec: _Optional[_Union[TensorSpec, _Mapping]] = ..., observation_spec: _Optional[_Union[TensorSpec, _Mapping]] = ..., action_spec: _Optional[_Union[TensorSpec, _Mapping]] = ...) -> None: ...

class ActRequest(_message.Message):
    __slots__ = ("session_id", "step", "input", "actions_in_flight", "tick", "episode")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    TICK_FIELD_NUMBER: _ClassVar[int]
    EPISODE_FIELD_NUMBER: _ClassVar[int]
    session_id: int
    step: int
    input: Tensor
    actions_in_flight: Tensor
    tick: int
    episode: int
    def __init__(self, session_id: _Optional[int] = ..., step: _Optional[int] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., actions_in_flight: _Optional[_Union[Tensor, _Mapping]] = ..., tick: _Optional[int] = ..., episode: _Optional[int] = ...) -> None: ...

class ActReply(_message.Message):
    __slots__ = ("step", "action", "queue_us", "compute_us", "chunk")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    step: int
    action: Tensor
    queue_us: int
    compute_us: int
    chunk: Tensor
    def __init__(self, step: _Optional[int] = ..., action: _Optional[_Union[Tensor, _Mapping]] = ..., queue_us: _Optional[int] = ..., compute_us: _Optional[int] = ..., chunk: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

from explaind.v1 import common_pb2 as _common_pb2
from google.longrunning import operations_pb2 as _operations_pb2  # type: ignore[import-untyped, unused-ignore]
from google.rpc import status_pb2 as _status_pb2  # type: ignore[import-untyped, unused-ignore]
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import Any as _Any, ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("images", "top_k", "return_features", "partial_failure")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETURN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FAILURE_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    top_k: int
    return_features: bool
    partial_failure: bool
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping[str, _Any]]]] = ..., top_k: _Optional[int] = ..., return_features: _Optional[bool] = ..., partial_failure: _Optional[bool] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "features", "model_version")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    features: _common_pb2.Tensor
    model_version: str
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping[str, _Any]]]] = ..., features: _Optional[_Union[_common_pb2.Tensor, _Mapping[str, _Any]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("class_indices", "labels", "probabilities", "error")
    CLASS_INDICES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    class_indices: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    error: _status_pb2.Status
    def __init__(self, class_indices: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[str]] = ..., probabilities: _Optional[_Iterable[float]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping[str, _Any]]] = ...) -> None: ...

class GetModelMetadataRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelMetadataResponse(_message.Message):
    __slots__ = ("classifier", "components", "batching", "limits", "capabilities")
    CLASSIFIER_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    classifier: ClassifierInfo
    components: _containers.RepeatedCompositeFieldContainer[ComponentStatus]
    batching: BatchingInfo
    limits: RequestLimits
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, classifier: _Optional[_Union[ClassifierInfo, _Mapping[str, _Any]]] = ..., components: _Optional[_Iterable[_Union[ComponentStatus, _Mapping[str, _Any]]]] = ..., batching: _Optional[_Union[BatchingInfo, _Mapping[str, _Any]]] = ..., limits: _Optional[_Union[RequestLimits, _Mapping[str, _Any]]] = ..., capabilities: _Optional[_Iterable[str]] = ...) -> None: ...

class RequestLimits(_message.Message):
    __slots__ = ("max_message_bytes", "max_pixels_per_request", "max_images_per_request", "max_image_side", "max_samples_per_caller", "max_calls_per_caller", "max_head_versions_per_caller", "max_visualization_steps")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_PER_CALLER_FIELD_NUMBER: _ClassVar[int]
    MAX_CALLS_PER_CALLER_FIELD_NUMBER: _ClassVar[int]
    MAX_HEAD_VERSIONS_PER_CALLER_FIELD_NUMBER: _ClassVar[int]
    MAX_VISUALIZATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_pixels_per_request: int
    max_images_per_request: int
    max_image_side: int
    max_samples_per_caller: int
    max_calls_per_caller: int
    max_head_versions_per_caller: int
    max_visualization_steps: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_pixels_per_request: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., max_image_side: _Optional[int] = ..., max_samples_per_caller: _Optional[int] = ..., max_calls_per_caller: _Optional[int] = ..., max_head_versions_per_caller: _Optional[int] = ..., max_visualization_steps: _Optional[int] = ...) -> None: ...

class ClassifierInfo(_message.Message):
    __slots__ = ("name", "loader", "source", "class_names", "feature_layer", "head", "feature_dim", "image_size", "model_version", "backend", "device", "supports_features", "resize_size", "interpolation", "supports_visualization", "normalization", "jpeg_reduced_decode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOADER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_FEATURES_FIELD_NUMBER: _ClassVar[int]
    RESIZE_SIZE_FIELD_NUMBER: _ClassVar[int]
    INTERPOLATION_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_VISUALIZATION_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    JPEG_REDUCED_DECODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    loader: str
    source: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    feature_layer: str
    head: str
    feature_dim: int
    image_size: int
    model_version: str
    backend: str
    device: str
    supports_features: bool
    resize_size: int
    interpolation: str
    supports_visualization: bool
    normalization: Normalization
    jpeg_reduced_decode: bool
    def __init__(self, name: _Optional[str] = ..., loader: _Optional[str] = ..., source: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., feature_layer: _Optional[str] = ..., head: _Optional[str] = ..., feature_dim: _Optional[int] = ..., image_size: _Optional[int] = ..., model_version: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., supports_features: _Optional[bool] = ..., resize_size: _Optional[int] = ..., interpolation: _Optional[str] = ..., supports_visualization: _Optional[bool] = ..., normalization: _Optional[_Union[Normalization, _Mapping[str, _Any]]] = ..., jpeg_reduced_decode: _Optional[bool] = ...) -> None: ...

class Normalization(_message.Message):
    __slots__ = ("mean", "std")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ...) -> None: ...

class ComponentStatus(_message.Message):
    __slots__ = ("name", "loaded", "source", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    loaded: bool
    source: str
    detail: str
    def __init__(self, name: _Optional[str] = ..., loaded: _Optional[bool] = ..., source: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class BatchingInfo(_message.Message):
    __slots__ = ("max_batch_size", "max_queue_delay_seconds", "max_queue_size", "max_queued_images_per_caller")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_IMAGES_PER_CALLER_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_queue_delay_seconds: float
    max_queue_size: int
    max_queued_images_per_caller: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_queue_delay_seconds: _Optional[float] = ..., max_queue_size: _Optional[int] = ..., max_queued_images_per_caller: _Optional[int] = ...) -> None: ...

class EvaluateSampleSetRequest(_message.Message):
    __slots__ = ("sample_set_id", "batch_size", "max_grid_images", "request_id", "run_id")
    SAMPLE_SET_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_GRID_IMAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    sample_set_id: str
    batch_size: int
    max_grid_images: int
    request_id: str
    run_id: str
    def __init__(self, sample_set_id: _Optional[str] = ..., batch_size: _Optional[int] = ..., max_grid_images: _Optional[int] = ..., request_id: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class EvaluateSampleSetResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: _operations_pb2.Operation
    def __init__(self, operation: _Optional[_Union[_operations_pb2.Operation, _Mapping[str, _Any]]] = ...) -> None: ...

class EvaluateSampleSetResult(_message.Message):
    __slots__ = ("sample_set_id", "model_version", "sample_count", "accuracy", "per_class", "confusion_matrix", "mistakes", "confusion_cells")
    SAMPLE_SET_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_MATRIX_FIELD_NUMBER: _ClassVar[int]
    MISTAKES_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_CELLS_FIELD_NUMBER: _ClassVar[int]
    sample_set_id: str
    model_version: str
    sample_count: int
    accuracy: float
    per_class: _containers.RepeatedCompositeFieldContainer[ClassAccuracy]
    confusion_matrix: _containers.RepeatedScalarFieldContainer[int]
    mistakes: _containers.RepeatedCompositeFieldContainer[Mistake]
    confusion_cells: _containers.RepeatedCompositeFieldContainer[ConfusionCell]
    def __init__(self, sample_set_id: _Optional[str] = ..., model_version: _Optional[str] = ..., sample_count: _Optional[int] = ..., accuracy: _Optional[float] = ..., per_class: _Optional[_Iterable[_Union[ClassAccuracy, _Mapping[str, _Any]]]] = ..., confusion_matrix: _Optional[_Iterable[int]] = ..., mistakes: _Optional[_Iterable[_Union[Mistake, _Mapping[str, _Any]]]] = ..., confusion_cells: _Optional[_Iterable[_Union[ConfusionCell, _Mapping[str, _Any]]]] = ...) -> None: ...

class ConfusionCell(_message.Message):
    __slots__ = ("label", "predicted", "count")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    label: int
    predicted: int
    count: int
    def __init__(self, label: _Optional[int] = ..., predicted: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class ClassAccuracy(_message.Message):
    __slots__ = ("class_name", "count", "accuracy")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    count: int
    accuracy: float
    def __init__(self, class_name: _Optional[str] = ..., count: _Optional[int] = ..., accuracy: _Optional[float] = ...) -> None: ...

class Mistake(_message.Message):
    __slots__ = ("sample_index", "label", "predicted", "probability")
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    sample_index: int
    label: int
    predicted: int
    probability: float
    def __init__(self, sample_index: _Optional[int] = ..., label: _Optional[int] = ..., predicted: _Optional[int] = ..., probability: _Optional[float] = ...) -> None: ...

import datetime

from explaind.v1 import common_pb2 as _common_pb2
from explaind.v1 import inference_pb2 as _inference_pb2
from google.longrunning import operations_pb2 as _operations_pb2  # type: ignore[import-untyped, unused-ignore]
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import Any as _Any, ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CounterfactualSolver(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COUNTERFACTUAL_SOLVER_UNSPECIFIED: _ClassVar[CounterfactualSolver]
    COUNTERFACTUAL_SOLVER_FAITHFUL: _ClassVar[CounterfactualSolver]
    COUNTERFACTUAL_SOLVER_PROXIMAL: _ClassVar[CounterfactualSolver]

class Execution(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXECUTION_UNSPECIFIED: _ClassVar[Execution]
    EXECUTION_INLINE: _ClassVar[Execution]
    EXECUTION_OPERATION: _ClassVar[Execution]

class NeuronDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NEURON_DIRECTION_UNSPECIFIED: _ClassVar[NeuronDirection]
    NEURON_DIRECTION_INSUFFICIENT: _ClassVar[NeuronDirection]
    NEURON_DIRECTION_EXCESSIVE: _ClassVar[NeuronDirection]
    NEURON_DIRECTION_BOTH: _ClassVar[NeuronDirection]

class VisualizationMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VISUALIZATION_METHOD_UNSPECIFIED: _ClassVar[VisualizationMethod]
    VISUALIZATION_METHOD_CLIP_ILLUSION: _ClassVar[VisualizationMethod]
    VISUALIZATION_METHOD_FEATURE_VISUALIZATION: _ClassVar[VisualizationMethod]
    VISUALIZATION_METHOD_NO_CLIP: _ClassVar[VisualizationMethod]

class HeadEditMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEAD_EDIT_METHOD_UNSPECIFIED: _ClassVar[HeadEditMethod]
    HEAD_EDIT_METHOD_PROBABILITY_RATIO: _ClassVar[HeadEditMethod]
    HEAD_EDIT_METHOD_CONSTRAIN: _ClassVar[HeadEditMethod]
COUNTERFACTUAL_SOLVER_UNSPECIFIED: CounterfactualSolver
COUNTERFACTUAL_SOLVER_FAITHFUL: CounterfactualSolver
COUNTERFACTUAL_SOLVER_PROXIMAL: CounterfactualSolver
EXECUTION_UNSPECIFIED: Execution
EXECUTION_INLINE: Execution
EXECUTION_OPERATION: Execution
NEURON_DIRECTION_UNSPECIFIED: NeuronDirection
NEURON_DIRECTION_INSUFFICIENT: NeuronDirection
NEURON_DIRECTION_EXCESSIVE: NeuronDirection
NEURON_DIRECTION_BOTH: NeuronDirection
VISUALIZATION_METHOD_UNSPECIFIED: VisualizationMethod
VISUALIZATION_METHOD_CLIP_ILLUSION: VisualizationMethod
VISUALIZATION_METHOD_FEATURE_VISUALIZATION: VisualizationMethod
VISUALIZATION_METHOD_NO_CLIP: VisualizationMethod
HEAD_EDIT_METHOD_UNSPECIFIED: HeadEditMethod
HEAD_EDIT_METHOD_PROBABILITY_RATIO: HeadEditMethod
HEAD_EDIT_METHOD_CONSTRAIN: HeadEditMethod

class RankMistakeNeuronsRequest(_message.Message):
    __slots__ = ("sample_set_id", "class_name", "class_index", "solver", "l1", "l2", "max_iterations", "cut_ratio", "top_k", "include_samples", "execution", "request_id", "stability_resamples", "run_id")
    SAMPLE_SET_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    L1_FIELD_NUMBER: _ClassVar[int]
    L2_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    CUT_RATIO_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STABILITY_RESAMPLES_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    sample_set_id: str
    class_name: str
    class_index: int
    solver: CounterfactualSolver
    l1: float
    l2: float
    max_iterations: int
    cut_ratio: float
    top_k: int
    include_samples: bool
    execution: Execution
    request_id: str
    stability_resamples: int
    run_id: str
    def __init__(self, sample_set_id: _Optional[str] = ..., class_name: _Optional[str] = ..., class_index: _Optional[int] = ..., solver: _Optional[_Union[CounterfactualSolver, str]] = ..., l1: _Optional[float] = ..., l2: _Optional[float] = ..., max_iterations: _Optional[int] = ..., cut_ratio: _Optional[float] = ..., top_k: _Optional[int] = ..., include_samples: _Optional[bool] = ..., execution: _Optional[_Union[Execution, str]] = ..., request_id: _Optional[str] = ..., stability_resamples: _Optional[int] = ..., run_id: _Optional[str] = ...) -> None: ...

class RankMistakeNeuronsResponse(_message.Message):
    __slots__ = ("ranking", "operation")
    RANKING_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    ranking: NeuronRanking
    operation: _operations_pb2.Operation
    def __init__(self, ranking: _Optional[_Union[NeuronRanking, _Mapping[str, _Any]]] = ..., operation: _Optional[_Union[_operations_pb2.Operation, _Mapping[str, _Any]]] = ...) -> None: ...

class RankedNeuron(_message.Message):
    __slots__ = ("neuron", "direction", "insufficient_ratio", "excessive_ratio", "mean_omega", "importance", "top_classes", "top_class_names", "stability")
    NEURON_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    INSUFFICIENT_RATIO_FIELD_NUMBER: _ClassVar[int]
    EXCESSIVE_RATIO_FIELD_NUMBER: _ClassVar[int]
    MEAN_OMEGA_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    TOP_CLASSES_FIELD_NUMBER: _ClassVar[int]
    TOP_CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    STABILITY_FIELD_NUMBER: _ClassVar[int]
    neuron: int
    direction: NeuronDirection
    insufficient_ratio: float
    excessive_ratio: float
    mean_omega: float
    importance: float
    top_classes: _containers.RepeatedScalarFieldContainer[int]
    top_class_names: _containers.RepeatedScalarFieldContainer[str]
    stability: float
    def __init__(self, neuron: _Optional[int] = ..., direction: _Optional[_Union[NeuronDirection, str]] = ..., insufficient_ratio: _Optional[float] = ..., excessive_ratio: _Optional[float] = ..., mean_omega: _Optional[float] = ..., importance: _Optional[float] = ..., top_classes: _Optional[_Iterable[int]] = ..., top_class_names: _Optional[_Iterable[str]] = ..., stability: _Optional[float] = ...) -> None: ...

class MistakeSummary(_message.Message):
    __slots__ = ("sample_index", "predicted_class", "converged", "iterations", "insufficient_neurons", "excessive_neurons", "omega_l1")
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_CLASS_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    INSUFFICIENT_NEURONS_FIELD_NUMBER: _ClassVar[int]
    EXCESSIVE_NEURONS_FIELD_NUMBER: _ClassVar[int]
    OMEGA_L1_FIELD_NUMBER: _ClassVar[int]
    sample_index: int
    predicted_class: int
    converged: bool
    iterations: int
    insufficient_neurons: _containers.RepeatedScalarFieldContainer[int]
    excessive_neurons: _containers.RepeatedScalarFieldContainer[int]
    omega_l1: float
    def __init__(self, sample_index: _Optional[int] = ..., predicted_class: _Optional[int] = ..., converged: _Optional[bool] = ..., iterations: _Optional[int] = ..., insufficient_neurons: _Optional[_Iterable[int]] = ..., excessive_neurons: _Optional[_Iterable[int]] = ..., omega_l1: _Optional[float] = ...) -> None: ...

class NeuronRanking(_message.Message):
    __slots__ = ("sample_set_id", "model_version", "class_index", "class_name", "solver", "sample_count", "mistake_count", "converged_count", "neurons", "mistakes", "omega", "predicted_as", "omega_artifact", "top_k", "stability_resamples", "stability_resamples_requested")
    class PredictedAsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SAMPLE_SET_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    MISTAKE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CONVERGED_COUNT_FIELD_NUMBER: _ClassVar[int]
    NEURONS_FIELD_NUMBER: _ClassVar[int]
    MISTAKES_FIELD_NUMBER: _ClassVar[int]
    OMEGA_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_AS_FIELD_NUMBER: _ClassVar[int]
    OMEGA_ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    STABILITY_RESAMPLES_FIELD_NUMBER: _ClassVar[int]
    STABILITY_RESAMPLES_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    sample_set_id: str
    model_version: str
    class_index: int
    class_name: str
    solver: str
    sample_count: int
    mistake_count: int
    converged_count: int
    neurons: _containers.RepeatedCompositeFieldContainer[RankedNeuron]
    mistakes: _containers.RepeatedCompositeFieldContainer[MistakeSummary]
    omega: _common_pb2.Tensor
    predicted_as: _containers.ScalarMap[str, int]
    omega_artifact: str
    top_k: int
    stability_resamples: int
    stability_resamples_requested: int
    def __init__(self, sample_set_id: _Optional[str] = ..., model_version: _Optional[str] = ..., class_index: _Optional[int] = ..., class_name: _Optional[str] = ..., solver: _Optional[str] = ..., sample_count: _Optional[int] = ..., mistake_count: _Optional[int] = ..., converged_count: _Optional[int] = ..., neurons: _Optional[_Iterable[_Union[RankedNeuron, _Mapping[str, _Any]]]] = ..., mistakes: _Optional[_Iterable[_Union[MistakeSummary, _Mapping[str, _Any]]]] = ..., omega: _Optional[_Union[_common_pb2.Tensor, _Mapping[str, _Any]]] = ..., predicted_as: _Optional[_Mapping[str, int]] = ..., omega_artifact: _Optional[str] = ..., top_k: _Optional[int] = ..., stability_resamples: _Optional[int] = ..., stability_resamples_requested: _Optional[int] = ...) -> None: ...

class NeuronClassPair(_message.Message):
    __slots__ = ("neuron", "class_name", "class_index")
    NEURON_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    neuron: int
    class_name: str
    class_index: int
    def __init__(self, neuron: _Optional[int] = ..., class_name: _Optional[str] = ..., class_index: _Optional[int] = ...) -> None: ...

class VisualizeNeuronsRequest(_message.Message):
    __slots__ = ("pairs", "method", "steps", "gamma", "epsilon", "learning_rate", "seed", "preview_every", "classes_per_neuron", "request_id", "run_id")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    CLASSES_PER_NEURON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[NeuronClassPair]
    method: VisualizationMethod
    steps: int
    gamma: float
    epsilon: float
    learning_rate: float
    seed: int
    preview_every: int
    classes_per_neuron: int
    request_id: str
    run_id: str
    def __init__(self, pairs: _Optional[_Iterable[_Union[NeuronClassPair, _Mapping[str, _Any]]]] = ..., method: _Optional[_Union[VisualizationMethod, str]] = ..., steps: _Optional[int] = ..., gamma: _Optional[float] = ..., epsilon: _Optional[float] = ..., learning_rate: _Optional[float] = ..., seed: _Optional[int] = ..., preview_every: _Optional[int] = ..., classes_per_neuron: _Optional[int] = ..., request_id: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class VisualizeNeuronsResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: _operations_pb2.Operation
    def __init__(self, operation: _Optional[_Union[_operations_pb2.Operation, _Mapping[str, _Any]]] = ...) -> None: ...

class NeuronVisualization(_message.Message):
    __slots__ = ("neuron", "class_index", "class_name", "image_artifact", "masked_image_artifact", "activation", "logit", "clip_similarity", "core_relevance", "mask_fraction")
    NEURON_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    MASKED_IMAGE_ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    CLIP_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    CORE_RELEVANCE_FIELD_NUMBER: _ClassVar[int]
    MASK_FRACTION_FIELD_NUMBER: _ClassVar[int]
    neuron: int
    class_index: int
    class_name: str
    image_artifact: str
    masked_image_artifact: str
    activation: float
    logit: float
    clip_similarity: float
    core_relevance: float
    mask_fraction: float
    def __init__(self, neuron: _Optional[int] = ..., class_index: _Optional[int] = ..., class_name: _Optional[str] = ..., image_artifact: _Optional[str] = ..., masked_image_artifact: _Optional[str] = ..., activation: _Optional[float] = ..., logit: _Optional[float] = ..., clip_similarity: _Optional[float] = ..., core_relevance: _Optional[float] = ..., mask_fraction: _Optional[float] = ...) -> None: ...

class VisualizeNeuronsResult(_message.Message):
    __slots__ = ("model_version", "method", "steps", "visualizations", "gamma", "epsilon", "learning_rate", "seed")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    VISUALIZATIONS_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    method: str
    steps: int
    visualizations: _containers.RepeatedCompositeFieldContainer[NeuronVisualization]
    gamma: float
    epsilon: float
    learning_rate: float
    seed: int
    def __init__(self, model_version: _Optional[str] = ..., method: _Optional[str] = ..., steps: _Optional[int] = ..., visualizations: _Optional[_Iterable[_Union[NeuronVisualization, _Mapping[str, _Any]]]] = ..., gamma: _Optional[float] = ..., epsilon: _Optional[float] = ..., learning_rate: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class EditHeadRequest(_message.Message):
    __slots__ = ("sample_set_id", "class_name", "class_index", "neurons", "method", "validation_sample_set_id", "evaluation_sample_set_id", "group_attribute", "strength", "target_ratio", "auto_target_ratio", "learning_rate", "max_epochs", "patience", "seed", "promote", "description", "request_id", "run_id")
    SAMPLE_SET_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    NEURONS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_SAMPLE_SET_ID_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_SAMPLE_SET_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    TARGET_RATIO_FIELD_NUMBER: _ClassVar[int]
    AUTO_TARGET_RATIO_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    PATIENCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PROMOTE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    sample_set_id: str
    class_name: str
    class_index: int
    neurons: _containers.RepeatedScalarFieldContainer[int]
    method: HeadEditMethod
    validation_sample_set_id: str
    evaluation_sample_set_id: str
    group_attribute: str
    strength: float
    target_ratio: float
    auto_target_ratio: bool
    learning_rate: float
    max_epochs: int
    patience: int
    seed: int
    promote: bool
    description: str
    request_id: str
    run_id: str
    def __init__(self, sample_set_id: _Optional[str] = ..., class_name: _Optional[str] = ..., class_index: _Optional[int] = ..., neurons: _Optional[_Iterable[int]] = ..., method: _Optional[_Union[HeadEditMethod, str]] = ..., validation_sample_set_id: _Optional[str] = ..., evaluation_sample_set_id: _Optional[str] = ..., group_attribute: _Optional[str] = ..., strength: _Optional[float] = ..., target_ratio: _Optional[float] = ..., auto_target_ratio: _Optional[bool] = ..., learning_rate: _Optional[float] = ..., max_epochs: _Optional[int] = ..., patience: _Optional[int] = ..., seed: _Optional[int] = ..., promote: _Optional[bool] = ..., description: _Optional[str] = ..., request_id: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class EditHeadResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: _operations_pb2.Operation
    def __init__(self, operation: _Optional[_Union[_operations_pb2.Operation, _Mapping[str, _Any]]] = ...) -> None: ...

class HeadEvaluation(_message.Message):
    __slots__ = ("accuracy", "per_class", "worst_class_name", "worst_class_accuracy", "group_accuracy", "worst_group", "worst_group_accuracy")
    class GroupAccuracyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    WORST_CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    WORST_CLASS_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    GROUP_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    WORST_GROUP_FIELD_NUMBER: _ClassVar[int]
    WORST_GROUP_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    accuracy: float
    per_class: _containers.RepeatedCompositeFieldContainer[_inference_pb2.ClassAccuracy]
    worst_class_name: str
    worst_class_accuracy: float
    group_accuracy: _containers.ScalarMap[str, float]
    worst_group: str
    worst_group_accuracy: float
    def __init__(self, accuracy: _Optional[float] = ..., per_class: _Optional[_Iterable[_Union[_inference_pb2.ClassAccuracy, _Mapping[str, _Any]]]] = ..., worst_class_name: _Optional[str] = ..., worst_class_accuracy: _Optional[float] = ..., group_accuracy: _Optional[_Mapping[str, float]] = ..., worst_group: _Optional[str] = ..., worst_group_accuracy: _Optional[float] = ...) -> None: ...

class HeadVersion(_message.Message):
    __slots__ = ("version_id", "model_version", "parent_version_id", "method", "class_name", "neurons", "description", "create_time", "active", "parent_evaluation", "evaluation", "owner")
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    NEURONS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    PARENT_EVALUATION_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    version_id: str
    model_version: str
    parent_version_id: str
    method: str
    class_name: str
    neurons: _containers.RepeatedScalarFieldContainer[int]
    description: str
    create_time: _timestamp_pb2.Timestamp
    active: bool
    parent_evaluation: HeadEvaluation
    evaluation: HeadEvaluation
    owner: str
    def __init__(self, version_id: _Optional[str] = ..., model_version: _Optional[str] = ..., parent_version_id: _Optional[str] = ..., method: _Optional[str] = ..., class_name: _Optional[str] = ..., neurons: _Optional[_Iterable[int]] = ..., description: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping[str, _Any]]] = ..., active: _Optional[bool] = ..., parent_evaluation: _Optional[_Union[HeadEvaluation, _Mapping[str, _Any]]] = ..., evaluation: _Optional[_Union[HeadEvaluation, _Mapping[str, _Any]]] = ..., owner: _Optional[str] = ...) -> None: ...

class EditHeadResult(_message.Message):
    __slots__ = ("version", "best_epoch", "epochs_run", "validation_accuracy", "target_ratio")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BEST_EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_RUN_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TARGET_RATIO_FIELD_NUMBER: _ClassVar[int]
    version: HeadVersion
    best_epoch: int
    epochs_run: int
    validation_accuracy: _containers.RepeatedScalarFieldContainer[float]
    target_ratio: float
    def __init__(self, version: _Optional[_Union[HeadVersion, _Mapping[str, _Any]]] = ..., best_epoch: _Optional[int] = ..., epochs_run: _Optional[int] = ..., validation_accuracy: _Optional[_Iterable[float]] = ..., target_ratio: _Optional[float] = ...) -> None: ...

class ListHeadVersionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListHeadVersionsResponse(_message.Message):
    __slots__ = ("versions", "active_version_id", "next_page_token")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[HeadVersion]
    active_version_id: str
    next_page_token: str
    def __init__(self, versions: _Optional[_Iterable[_Union[HeadVersion, _Mapping[str, _Any]]]] = ..., active_version_id: _Optional[str] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetHeadVersionRequest(_message.Message):
    __slots__ = ("version_id",)
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    version_id: str
    def __init__(self, version_id: _Optional[str] = ...) -> None: ...

class GetHeadVersionResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: HeadVersion
    def __init__(self, version: _Optional[_Union[HeadVersion, _Mapping[str, _Any]]] = ...) -> None: ...

class PromoteHeadVersionRequest(_message.Message):
    __slots__ = ("version_id",)
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    version_id: str
    def __init__(self, version_id: _Optional[str] = ...) -> None: ...

class PromoteHeadVersionResponse(_message.Message):
    __slots__ = ("version", "previous_version_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    version: HeadVersion
    previous_version_id: str
    def __init__(self, version: _Optional[_Union[HeadVersion, _Mapping[str, _Any]]] = ..., previous_version_id: _Optional[str] = ...) -> None: ...

class RollbackHeadVersionRequest(_message.Message):
    __slots__ = ("version_id",)
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    version_id: str
    def __init__(self, version_id: _Optional[str] = ...) -> None: ...

class RollbackHeadVersionResponse(_message.Message):
    __slots__ = ("version", "previous_version_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    version: HeadVersion
    previous_version_id: str
    def __init__(self, version: _Optional[_Union[HeadVersion, _Mapping[str, _Any]]] = ..., previous_version_id: _Optional[str] = ...) -> None: ...

class DeleteHeadVersionRequest(_message.Message):
    __slots__ = ("version_id",)
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    version_id: str
    def __init__(self, version_id: _Optional[str] = ...) -> None: ...

class DeleteHeadVersionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

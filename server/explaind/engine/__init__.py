"""Model serving without gRPC: loading and splitting classifiers, backends, dynamic
batching, the model registry, the :class:`Engine` that ties them to the store and jobs,
and the :class:`NeuroInspectEngine` that runs the method's jobs on it."""

from .batcher import DynamicBatcher
from .core import BatchOutput, Engine, NewSample, PredictOutput, SampleFeatures, check_new_sample_set, check_sample_set_id, unusable_image
from .models import Backbone, ClassifierVersion, ComponentStatus, load_classifier, split_classifier
from .neuroinspect import NeuroInspectEngine, RankSettings
from .registry import ModelRegistry

__all__ = [
    "Backbone",
    "BatchOutput",
    "ClassifierVersion",
    "ComponentStatus",
    "DynamicBatcher",
    "Engine",
    "ModelRegistry",
    "NeuroInspectEngine",
    "NewSample",
    "PredictOutput",
    "RankSettings",
    "SampleFeatures",
    "check_new_sample_set",
    "check_sample_set_id",
    "load_classifier",
    "split_classifier",
    "unusable_image",
]

"""Model serving without gRPC: loading and splitting classifiers, backends, dynamic
batching, the model registry and the :class:`Engine` that ties them to the store and jobs."""

from .batcher import DynamicBatcher
from .core import BatchOutput, Engine, NewSample, PredictOutput, SampleFeatures, check_sample_set_id
from .models import ClassifierVersion, ComponentStatus, FeatureExtractor, load_classifier, split_classifier
from .registry import ModelRegistry

__all__ = [
    "BatchOutput",
    "ClassifierVersion",
    "ComponentStatus",
    "DynamicBatcher",
    "Engine",
    "FeatureExtractor",
    "ModelRegistry",
    "NewSample",
    "PredictOutput",
    "SampleFeatures",
    "check_sample_set_id",
    "load_classifier",
    "split_classifier",
]

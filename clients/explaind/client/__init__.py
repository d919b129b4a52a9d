"""Python SDK for explaind.

    from explaind.client import Client
    with Client("127.0.0.1:50051") as client:
        client.wait_until_ready()
        print(client.predict(images, top_k=3)[0].label)
        report = client.evaluate_sample_set("my-set").result(progress=True)

    from explaind.client import AsyncClient
    async with AsyncClient("127.0.0.1:50051") as client:
        predictions = await client.predict(images, top_k=3)
        report = await client.result(await client.evaluate_sample_set("my-set"))
"""

from ._async import AsyncClient
from ._client import Client
from ._errors import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    ExplaindError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OperationError,
    OutOfRangeError,
    PermissionDeniedError,
    PlaintextTokenWarning,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from ._images import image_folder
from ._neuroinspect import ActiveHeadChange, HeadEdit, HeadEvaluation, HeadVersion, MistakeSummary, NeuronRanking, NeuronVisualization, NeuronVisualizations, RankedNeuron
from ._operations import EvaluatedMistake, Evaluation, Operation
from ._types import Artifact, Component, ModelMetadata, Normalization, Prediction, Progress, RequestLimits, Sample, SampleSet

__all__ = [
    "AbortedError",
    "ActiveHeadChange",
    "AlreadyExistsError",
    "Artifact",
    "AsyncClient",
    "CancelledError",
    "Client",
    "Component",
    "DataLossError",
    "DeadlineExceededError",
    "EvaluatedMistake",
    "Evaluation",
    "ExplaindError",
    "FailedPreconditionError",
    "HeadEdit",
    "HeadEvaluation",
    "HeadVersion",
    "InternalError",
    "InvalidArgumentError",
    "MistakeSummary",
    "ModelMetadata",
    "NeuronRanking",
    "NeuronVisualization",
    "NeuronVisualizations",
    "Normalization",
    "NotFoundError",
    "Operation",
    "OperationError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "PlaintextTokenWarning",
    "Prediction",
    "Progress",
    "RankedNeuron",
    "RequestLimits",
    "ResourceExhaustedError",
    "Sample",
    "SampleSet",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "image_folder",
]

"""InferenceService: Predict, GetModelMetadata, EvaluateSampleSet."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future

import grpc
import numpy as np
import torch
from explaind.v1 import inference_pb2, inference_pb2_grpc

from ..engine import BatchOutput, Engine, PredictOutput, unusable_image
from ..engine.neuroinspect import MAX_VISUALIZATION_STEPS
from ..errors import Cancelled, DeadlineExceeded, ExplaindError, InvalidArgument, Unavailable
from ..imaging import MAX_IMAGE_SIDE, InputGeometry, PixelBudget, stacked_batch
from ..messages import array_to_tensor
from ..tracing import count_on_current_span
from . import convert
from .auth import current_caller
from .interceptors import ThrottledLog, who
from .sample_sets import required_set_id


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine: Engine, *, serving: Callable[[], bool]) -> None:
        """``serving``: whether the served head is final. At start-up the model file's head
        is loaded before the stored active head version replaces it; until then Predict and
        EvaluateSampleSet are UNAVAILABLE, so no answer comes from a head about to go."""
        self._engine = engine
        self._serving = serving
        # A partial_failure Predict's failed images, logged as the interceptor logs a refused
        # call (at most once a minute): the operator chasing a producer of bad images sees
        # it, and who sends them, whether or not its calls set the flag.
        self._image_errors_log = ThrottledLog()

    def _require_serving(self) -> None:
        if not self._serving():
            raise Unavailable("models are still loading; retry when health reports SERVING")

    def Predict(self, request: inference_pb2.PredictRequest, context: grpc.ServicerContext) -> inference_pb2.PredictResponse:
        self._require_serving()
        limit = self._engine.config.batching.max_images_per_request
        if not request.images:
            raise InvalidArgument("at least one image is required", field="images")
        if len(request.images) > limit:
            raise InvalidArgument(f"{len(request.images)} images exceed the limit of {limit} per request; split them into several calls", field="images")
        self._engine.check_predict_room(len(request.images), caller=current_caller())
        # Each image is resized as it is decoded: the request never holds full-size floats.
        geometry = self._engine.models.active.input_geometry
        budget = PixelBudget(self._engine.config.server.max_pixels_per_request, field="images", memory=self._engine.decode_memory.lease(context))
        if request.partial_failure:
            return self._predict_each(request, context, geometry, budget)
        with budget:  # the decode memory held, given back before the forward
            images = stacked_batch([convert.decode_image(image, field=f"images[{i}]", geometry=geometry, budget=budget) for i, image in enumerate(request.images)],
                                   field="images")
        future = self._engine.submit_predict(images, top_k=request.top_k, return_features=request.return_features, caller=current_caller())
        result = self._engine.finish_predict(_awaited(future, context))
        response = inference_pb2.PredictResponse(model_version=result.model_version)
        for indices, probabilities, labels in zip(result.class_indices, result.probabilities, result.labels, strict=True):
            response.predictions.add(class_indices=indices.tolist(), labels=labels, probabilities=probabilities.tolist())
        if result.features is not None:
            response.features.CopyFrom(array_to_tensor(result.features))
        return response

    def _predict_each(self, request: inference_pb2.PredictRequest, context: grpc.ServicerContext, geometry: InputGeometry,
                      budget: PixelBudget) -> inference_pb2.PredictResponse:
        """Predict with partial_failure: each image is decoded once, an image that fails
        alone (INVALID_ARGUMENT decoding it, unusable logits) is answered with its error,
        and only the images that decoded go to the batcher (none: no forward pass). Faults
        of the request (its options, the pixel budget of all its images, a full queue, the
        deadline) still fail the call, as a decoder out of memory does (the server's, not
        the image's: DecodeOutOfMemory is no InvalidArgument)."""
        decoded: list[torch.Tensor] = []
        rows: list[int] = []  # the request index of each decoded image
        failed: dict[int, ExplaindError] = {}
        with budget:
            for i, image in enumerate(request.images):
                try:
                    decoded.append(convert.decode_image(image, field=f"images[{i}]", geometry=geometry, budget=budget))
                    rows.append(i)
                except InvalidArgument as error:
                    if budget.exceeded:
                        raise
                    # A fresh error: the caught one's traceback (and its decoder's error, its
                    # context) keeps the frames of its decoding alive, full-size pixels and all,
                    # until the response is made: 8 MiB an int32 image of 1024² past 65535.
                    failed[i] = InvalidArgument(error.description, field=error.field)
        result: PredictOutput | None = None
        if decoded:
            future = self._engine.submit_predict(stacked_batch(decoded, field="images"), top_k=request.top_k, return_features=request.return_features,
                                                 partial_failure=True, caller=current_caller())
            result = self._engine.finish_predict(_awaited(future, context))
            failed.update((rows[row], unusable_image(rows[row])) for row in result.unusable_rows)
        else:
            self._engine.predict_options(top_k=request.top_k, return_features=request.return_features)  # refused as with images to run
        response = inference_pb2.PredictResponse(model_version=result.model_version if result is not None else self._engine.models.active.version)
        answered = {i: row for row, i in enumerate(rows)}
        for i in range(len(request.images)):
            if (error := failed.get(i)) is not None:
                response.predictions.add(error=convert.error_status(error))
                self._engine.metrics.predict_image_errors.labels(code=error.code).inc()
            else:
                assert result is not None  # an image not failed was decoded and run
                row = answered[i]
                response.predictions.add(class_indices=result.class_indices[row].tolist(), labels=result.labels[row],
                                         probabilities=result.probabilities[row].tolist())
        if failed:
            count_on_current_span("explaind.predict.failed_images", len(failed))
            first = failed[min(failed)]
            self._image_errors_log.log(logging.INFO, "answered explaind.v1.InferenceService/Predict from %s with %d of %d images failed, the first %s: %s",
                                       who(context, current_caller()), len(failed), len(request.images), first.code, first)
        if request.return_features:
            # Row i for images[i]; a failed image's row NaN (see PredictResponse.features).
            features = np.full((len(request.images), self._engine.models.active.feature_dim), np.nan, dtype=np.float32)
            if result is not None and result.features is not None:
                features[rows] = result.features
                features[list(failed)] = np.nan
            response.features.CopyFrom(array_to_tensor(features))
        return response

    def GetModelMetadata(self, request: inference_pb2.GetModelMetadataRequest, context: grpc.ServicerContext) -> inference_pb2.GetModelMetadataResponse:
        engine = self._engine
        version = engine.models.active
        batching, server = engine.config.batching, engine.config.server
        backend, device = engine.runtime(version)
        return inference_pb2.GetModelMetadataResponse(
            classifier=inference_pb2.ClassifierInfo(
                name=version.name,
                loader=version.loader,
                source=version.source,
                class_names=version.class_names,
                feature_layer=version.feature_layer,
                head=version.head_name,
                feature_dim=version.feature_dim,
                image_size=version.image_size,
                resize_size=version.resize_size,
                interpolation=version.interpolation,
                jpeg_reduced_decode=version.jpeg_reduced_decode,
                model_version=version.version,
                backend=backend,
                device=device,
                supports_features=version.supports_features,
                supports_visualization=version.differentiable,
                normalization=inference_pb2.Normalization(mean=version.normalization[0], std=version.normalization[1]),
            ),
            components=[inference_pb2.ComponentStatus(name=s.name, loaded=s.loaded, source=s.source, detail=s.detail) for s in engine.components.values()],
            batching=inference_pb2.BatchingInfo(
                max_batch_size=batching.max_batch_size, max_queue_delay_seconds=batching.max_queue_delay_ms / 1000.0, max_queue_size=batching.max_queue_size,
                max_queued_images_per_caller=batching.max_queued_images_per_caller,
            ),
            limits=inference_pb2.RequestLimits(
                max_message_bytes=server.max_message_bytes, max_pixels_per_request=server.max_pixels_per_request,
                max_images_per_request=batching.max_images_per_request, max_image_side=MAX_IMAGE_SIDE,
                max_samples_per_caller=server.max_samples_per_caller, max_calls_per_caller=server.calls_per_caller if server.callers_file else 0,
                max_head_versions_per_caller=server.max_head_versions_per_caller, max_visualization_steps=MAX_VISUALIZATION_STEPS,
            ),
            capabilities=convert.CAPABILITIES,
        )

    def EvaluateSampleSet(self, request: inference_pb2.EvaluateSampleSetRequest, context: grpc.ServicerContext) -> inference_pb2.EvaluateSampleSetResponse:
        self._require_serving()
        snapshot = self._engine.evaluate_sample_set(required_set_id(request), batch_size=request.batch_size, max_grid_images=request.max_grid_images,
                                                    request=convert.request_key(request), caller=current_caller())
        return inference_pb2.EvaluateSampleSetResponse(operation=convert.operation(snapshot))


def _awaited(future: Future, context: grpc.ServicerContext) -> BatchOutput:
    """A submitted prediction's output, within the call's deadline; the request is dropped
    if the caller leaves before it runs."""
    context.add_callback(future.cancel)  # the caller left: drop the request if not yet run
    remaining = context.time_remaining()  # 9.2e18 s without a deadline: no lock waits that long
    try:
        return future.result(timeout=remaining if remaining is not None and remaining < threading.TIMEOUT_MAX else None)
    except TimeoutError:
        future.cancel()
        raise DeadlineExceeded("the prediction did not finish before the call's deadline") from None
    except CancelledError:
        raise Cancelled("the call was cancelled") from None

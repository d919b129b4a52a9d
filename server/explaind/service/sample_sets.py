"""SampleSetService: named, persistent sets of labelled images."""

from __future__ import annotations

import uuid

import grpc
from explaind.v1 import common_pb2, sample_sets_pb2, sample_sets_pb2_grpc

from ..engine import Engine, check_new_sample_set, check_sample_set_id
from ..errors import InvalidArgument
from ..imaging import PixelBudget
from . import convert
from .auth import current_caller
from .paging import messages_that_fit, listing_name, next_offset_token, offset_page, offset_token, page_limit, require_token_of_set, resume_point, resume_token

def required_set_id(request) -> str:
    """The request's ``sample_set_id``; an empty or malformed one is a bad request, not an unknown set."""
    if not request.sample_set_id:
        raise InvalidArgument("required", field="sample_set_id")
    check_sample_set_id(request.sample_set_id)
    return request.sample_set_id


def optional_uid(request) -> str:
    """The request's ``sample_set_uid`` ("" for any set of the id); one that is no
    SampleSet.uid is a bad request, not a set that changed."""
    uid = request.sample_set_uid
    try:
        canonical = not uid or str(uuid.UUID(uid)) == uid
    except ValueError:
        canonical = False
    if not canonical:
        raise InvalidArgument(f"{uid[:64]!r} is not a sample set uid (a lowercase UUID, as SampleSet.uid)", field="sample_set_uid")
    return uid


class SampleSetServicer(sample_sets_pb2_grpc.SampleSetServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _check_sample_count(self, samples) -> None:
        """At most ``[batching].max_images_per_request`` samples: each is a durable write,
        and tiny images slip under the pixel limit by the million."""
        limit = self._engine.config.batching.max_images_per_request
        if len(samples) > limit:
            raise InvalidArgument(f"{len(samples)} samples exceed the limit of {limit} per request; split them into AppendSamples requests",
                                  field="samples")

    def _samples(self, samples, context: grpc.ServicerContext) -> list:
        """The decoded samples. Called after every check that reads no image, so that a
        request those refuse costs no decoding."""
        budget = PixelBudget(self._engine.config.server.max_pixels_per_request, field="samples", memory=self._engine.decode_memory.lease(context))
        jpeg_min_side = self._engine.models.active.input_geometry.jpeg_min_side
        with budget:
            return [convert.new_sample(sample, field=f"samples[{i}]", budget=budget, jpeg_min_side=jpeg_min_side) for i, sample in enumerate(samples)]

    def CreateSampleSet(self, request, context: grpc.ServicerContext) -> sample_sets_pb2.CreateSampleSetResponse:
        check_new_sample_set(request.sample_set_id, request.display_name)
        if not request.samples:
            raise InvalidArgument("a sample set needs at least one sample", field="samples")
        self._check_sample_count(request.samples)
        # A repeat (request_id) is answered before its images are decoded.
        key = convert.request_key(request, apart="samples")
        if (info := self._engine.repeated_sample_set_request(key, "CreateSampleSet")) is None:
            caller = current_caller()
            self._engine.check_create(request.sample_set_id, len(request.samples), caller=caller)
            info = self._engine.create_sample_set(request.sample_set_id, request.display_name, self._samples(request.samples, context),
                                                  uploading=request.upload_continues, caller_waits=context.is_active, request=key,
                                                  caller=caller)
        return sample_sets_pb2.CreateSampleSetResponse(sample_set=convert.sample_set(info))

    def AppendSamples(self, request, context: grpc.ServicerContext) -> sample_sets_pb2.AppendSamplesResponse:
        set_id, uid = required_set_id(request), optional_uid(request)
        self._check_sample_count(request.samples)
        key = convert.request_key(request, apart="samples")
        if (info := self._engine.repeated_sample_set_request(key, "AppendSamples")) is None:
            caller = current_caller()
            self._engine.check_append(set_id, len(request.samples), finish_upload=request.finish_upload, uid=uid, caller=caller)
            info = self._engine.append_samples(set_id, self._samples(request.samples, context), finish_upload=request.finish_upload,
                                               caller_waits=context.is_active, uid=uid, request=key, caller=caller)
        return sample_sets_pb2.AppendSamplesResponse(sample_set=convert.sample_set(info))

    def GetSampleSet(self, request, context: grpc.ServicerContext) -> sample_sets_pb2.GetSampleSetResponse:
        return sample_sets_pb2.GetSampleSetResponse(sample_set=convert.sample_set(self._engine.store.get_sample_set(required_set_id(request))))

    def ListSampleSets(self, request, context: grpc.ServicerContext) -> sample_sets_pb2.ListSampleSetsResponse:
        listing = listing_name("sample_sets", owner=request.owner)
        after, limit = resume_point(request.page_token, listing), page_limit(request.page_size, 100, 1000)
        infos = self._engine.store.list_sample_sets(owner=request.owner, after=after, limit=limit)
        last = infos[-1] if len(infos) == limit else None
        return sample_sets_pb2.ListSampleSetsResponse(sample_sets=[convert.sample_set(i) for i in infos],
                                                      next_page_token=resume_token(listing, last.create_time, last.sample_set_id) if last else "")

    def ListSamples(self, request, context: grpc.ServicerContext) -> sample_sets_pb2.ListSamplesResponse:
        """A page of samples that ends early (but never empty) where one more would exceed the
        server's send limit: large images would otherwise fail the whole page."""
        set_id, store = required_set_id(request), self._engine.store
        offset, limit, named = offset_page(request.page_token, request.page_size, 256, 4096)  # malformed: the request's mistake, before an unknown set
        # Its tokens name the set and its uid: another set's, or an earlier set's of the id, would page this one from their offset.
        uid = store.get_sample_set(set_id).uid
        require_token_of_set(request.page_token, named, set_id, uid)
        records = store.list_samples(set_id, offset, limit, uid=uid)  # the set the token was checked against, not one made since
        stored = (sample_sets_pb2.Sample(image=common_pb2.Image(encoded=store.get_blob(record.digest)), label=record.label,
                                         attributes=record.attributes) for record in records)  # read as the page fills
        samples = messages_that_fit(stored, self._engine.config.server.max_message_bytes)
        ended_early = len(samples) < len(records)
        return sample_sets_pb2.ListSamplesResponse(
            samples=samples,
            next_page_token=offset_token(offset + len(samples), sample_set_id=set_id, uid=uid) if ended_early
            else next_offset_token(offset, limit, len(records), sample_set_id=set_id, uid=uid))

    def DeleteSampleSet(self, request, context: grpc.ServicerContext) -> sample_sets_pb2.DeleteSampleSetResponse:
        self._engine.delete_sample_set(required_set_id(request), uid=optional_uid(request), caller=current_caller())
        return sample_sets_pb2.DeleteSampleSetResponse()

import datetime

from explaind.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import Any as _Any, ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sample(_message.Message):
    __slots__ = ("image", "label", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    image: _common_pb2.Image
    label: int
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, image: _Optional[_Union[_common_pb2.Image, _Mapping[str, _Any]]] = ..., label: _Optional[int] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SampleSet(_message.Message):
    __slots__ = ("sample_set_id", "display_name", "sample_count", "class_counts", "create_time", "update_time", "uploading", "uid", "owner")
    class ClassCountsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    SAMPLE_SET_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CLASS_COUNTS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPLOADING_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    sample_set_id: str
    display_name: str
    sample_count: int
    class_counts: _containers.ScalarMap[int, int]
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    uploading: bool
    uid: str
    owner: str
    def __init__(self, sample_set_id: _Optional[str] = ..., display_name: _Optional[str] = ..., sample_count: _Optional[int] = ..., class_counts: _Optional[_Mapping[int, int]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping[str, _Any]]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping[str, _Any]]] = ..., uploading: _Optional[bool] = ..., uid: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class CreateSampleSetRequest(_message.Message):
    __slots__ = ("sample_set_id", "display_name", "samples", "upload_continues", "request_id")
    SAMPLE_SET_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_CONTINUES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    sample_set_id: str
    display_name: str
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    upload_continues: bool
    request_id: str
    def __init__(self, sample_set_id: _Optional[str] = ..., display_name: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping[str, _Any]]]] = ..., upload_continues: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateSampleSetResponse(_message.Message):
    __slots__ = ("sample_set",)
    SAMPLE_SET_FIELD_NUMBER: _ClassVar[int]
    sample_set: SampleSet
    def __init__(self, sample_set: _Optional[_Union[SampleSet, _Mapping[str, _Any]]] = ...) -> None: ...

class AppendSamplesRequest(_message.Message):
    __slots__ = ("sample_set_id", "samples", "finish_upload", "sample_set_uid", "request_id")
    SAMPLE_SET_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    FINISH_UPLOAD_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SET_UID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    sample_set_id: str
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    finish_upload: bool
    sample_set_uid: str
    request_id: str
    def __init__(self, sample_set_id: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping[str, _Any]]]] = ..., finish_upload: _Optional[bool] = ..., sample_set_uid: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class AppendSamplesResponse(_message.Message):
    __slots__ = ("sample_set",)
    SAMPLE_SET_FIELD_NUMBER: _ClassVar[int]
    sample_set: SampleSet
    def __init__(self, sample_set: _Optional[_Union[SampleSet, _Mapping[str, _Any]]] = ...) -> None: ...

class GetSampleSetRequest(_message.Message):
    __slots__ = ("sample_set_id",)
    SAMPLE_SET_ID_FIELD_NUMBER: _ClassVar[int]
    sample_set_id: str
    def __init__(self, sample_set_id: _Optional[str] = ...) -> None: ...

class GetSampleSetResponse(_message.Message):
    __slots__ = ("sample_set",)
    SAMPLE_SET_FIELD_NUMBER: _ClassVar[int]
    sample_set: SampleSet
    def __init__(self, sample_set: _Optional[_Union[SampleSet, _Mapping[str, _Any]]] = ...) -> None: ...

class ListSampleSetsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "owner")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    owner: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class ListSampleSetsResponse(_message.Message):
    __slots__ = ("sample_sets", "next_page_token")
    SAMPLE_SETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sample_sets: _containers.RepeatedCompositeFieldContainer[SampleSet]
    next_page_token: str
    def __init__(self, sample_sets: _Optional[_Iterable[_Union[SampleSet, _Mapping[str, _Any]]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListSamplesRequest(_message.Message):
    __slots__ = ("sample_set_id", "page_size", "page_token")
    SAMPLE_SET_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sample_set_id: str
    page_size: int
    page_token: str
    def __init__(self, sample_set_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSamplesResponse(_message.Message):
    __slots__ = ("samples", "next_page_token")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    next_page_token: str
    def __init__(self, samples: _Optional[_Iterable[_Union[Sample, _Mapping[str, _Any]]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteSampleSetRequest(_message.Message):
    __slots__ = ("sample_set_id", "sample_set_uid")
    SAMPLE_SET_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SET_UID_FIELD_NUMBER: _ClassVar[int]
    sample_set_id: str
    sample_set_uid: str
    def __init__(self, sample_set_id: _Optional[str] = ..., sample_set_uid: _Optional[str] = ...) -> None: ...

class DeleteSampleSetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

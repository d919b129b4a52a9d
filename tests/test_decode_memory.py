"""[server].max_decode_bytes: calls wait for room to decode their images, within their
deadline and while their caller stays, and give it back however their decode ends."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from explaind.v1 import common_pb2

from explaind.decode_memory import MIB, DecodeMemory
from explaind.errors import Cancelled, DeadlineExceeded, InvalidArgument
from explaind.imaging import PixelBudget, encode_png
from explaind.metrics import Metrics
from explaind.service import convert


class _Call:
    """A servicer context: ``remaining`` seconds to its deadline (None: none), active
    until ``leave`` is set; ``waiting`` is set once a wait for room asks whether it is."""

    def __init__(self, remaining: float | None = None) -> None:
        self.remaining, self.leave, self.waiting = remaining, threading.Event(), threading.Event()

    def time_remaining(self) -> float | None:
        return self.remaining

    def is_active(self) -> bool:
        self.waiting.set()
        return not self.leave.is_set()

    def add_callback(self, callback) -> bool:
        return True

    def peer(self) -> str:  # a partially failed Predict logs it
        return "ipv4:127.0.0.1:1"


def _in_thread(work: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """A thread running ``work``; its outcome (what it returned, or its error) lands in the list."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(work())
        except Exception as error:  # noqa: BLE001 - the test reads it
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _reserve_in_thread(memory: DecodeMemory, nbytes: int, call: _Call) -> tuple[threading.Thread, list[object]]:
    """A thread reserving ``nbytes`` on a new lease; its outcome (the lease, or the error) lands in the list."""

    def reserve() -> object:
        lease = memory.lease(call)
        lease.reserve(nbytes)
        return lease

    return _in_thread(reserve)


def test_a_call_waits_for_room_and_decodes_once_another_gives_it_back():
    metrics = Metrics()
    memory = DecodeMemory(100 * MIB, held_gauge=metrics.decode_memory_held, wait_seconds=metrics.decode_memory_wait)
    first = memory.lease(_Call())
    first.reserve(80 * MIB)
    thread, outcome = _reserve_in_thread(memory, 40 * MIB, _Call())
    thread.join(0.3)
    assert thread.is_alive() and not outcome and memory.held == 80 * MIB
    first.release()
    thread.join(10)
    assert not thread.is_alive() and outcome[0].held == 40 * MIB and memory.held == 40 * MIB
    assert metrics.registry.get_sample_value("explaind_decode_memory_bytes") == 40 * MIB
    assert metrics.registry.get_sample_value("explaind_decode_memory_wait_seconds_count") == 2
    outcome[0].release()
    assert memory.held == 0 and metrics.registry.get_sample_value("explaind_decode_memory_bytes") == 0


def test_a_wait_ends_deadline_exceeded_at_the_calls_deadline_holding_nothing():
    metrics = Metrics()
    memory = DecodeMemory(100 * MIB, wait_seconds=metrics.decode_memory_wait)
    memory.lease(_Call()).reserve(80 * MIB)
    lease = memory.lease(_Call(remaining=0.2))
    with pytest.raises(DeadlineExceeded, match="max_decode_bytes"):
        lease.reserve(40 * MIB)
    assert lease.held == 0 and memory.held == 80 * MIB
    # Timed as the others: a call starved until its deadline is the wait an alert must see.
    assert metrics.registry.get_sample_value("explaind_decode_memory_wait_seconds_count") == 2


def test_a_wait_ends_cancelled_when_the_caller_leaves():
    metrics = Metrics()
    memory = DecodeMemory(100 * MIB, wait_seconds=metrics.decode_memory_wait)
    memory.lease(_Call()).reserve(80 * MIB)
    call = _Call()
    thread, outcome = _reserve_in_thread(memory, 40 * MIB, call)
    call.leave.set()
    thread.join(10)
    assert isinstance(outcome[0], Cancelled) and memory.held == 80 * MIB
    # Timed too, as README says: a caller that left waiting is one the budget starved.
    assert metrics.registry.get_sample_value("explaind_decode_memory_wait_seconds_count") == 2


def test_a_call_larger_than_the_whole_budget_decodes_alone():
    memory = DecodeMemory(32 * MIB)
    small = memory.lease(_Call())
    small.reserve(20 * MIB)
    thread, outcome = _reserve_in_thread(memory, 100 * MIB, _Call())
    thread.join(0.3)
    assert thread.is_alive() and not outcome
    small.release()
    thread.join(10)
    assert outcome[0].held == 100 * MIB and memory.held == 100 * MIB


def test_calls_growing_at_once_never_wait_on_each_other():
    """Two calls each holding half the budget, each growing to most of it: the one that
    cannot grow gives back what it holds while it waits, so both decode in turn."""
    memory = DecodeMemory(100 * MIB)
    leases = [memory.lease(_Call(remaining=5)), memory.lease(_Call(remaining=5))]
    for lease in leases:
        lease.reserve(50 * MIB)
    outcomes: list[object] = []

    def grow(lease) -> None:
        try:
            lease.reserve(80 * MIB)
            outcomes.append(lease.held)
            lease.release()
        except Exception as error:  # noqa: BLE001 - the test reads it
            outcomes.append(error)

    threads = [threading.Thread(target=grow, args=(lease,), daemon=True) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert outcomes == [80 * MIB, 80 * MIB] and memory.held == 0


def _waiting_or_done(call: _Call, thread: threading.Thread) -> None:
    """Block until ``thread``'s reservation waits for room (it holds the budget's lock
    until its wait begins) or it ended without waiting."""
    while not call.waiting.wait(0.01) and thread.is_alive():
        pass


@pytest.mark.parametrize("large", [80 * MIB, 150 * MIB], ids=["larger than the room", "larger than the budget"])
def test_a_large_waiting_call_is_not_overtaken_by_smaller_ones_that_would_fit(large):
    """First come first served: a call that would fit does not take room ahead of an
    earlier waiter, else a stream of small calls starves a large one until its deadline."""
    memory = DecodeMemory(100 * MIB)
    first = memory.lease(_Call())
    first.reserve(60 * MIB)
    large_call, small_call = _Call(), _Call()
    large_thread, large_outcome = _reserve_in_thread(memory, large, large_call)
    _waiting_or_done(large_call, large_thread)
    small_thread, small_outcome = _reserve_in_thread(memory, 30 * MIB, small_call)
    _waiting_or_done(small_call, small_thread)
    assert not small_outcome and memory.held == 60 * MIB  # 30 MiB fit, yet it waits its turn
    first.release()
    large_thread.join(10)
    assert large_outcome[0].held == large and memory.held == large
    assert small_thread.is_alive() and not small_outcome  # its turn, but no room yet
    large_outcome[0].release()
    small_thread.join(10)
    assert small_outcome[0].held == 30 * MIB and memory.held == 30 * MIB


def test_a_waiter_that_leaves_lets_the_next_one_in():
    memory = DecodeMemory(100 * MIB)
    memory.lease(_Call()).reserve(60 * MIB)
    large_call, small_call = _Call(), _Call()
    large_thread, large_outcome = _reserve_in_thread(memory, 80 * MIB, large_call)
    _waiting_or_done(large_call, large_thread)
    small_thread, small_outcome = _reserve_in_thread(memory, 30 * MIB, small_call)
    _waiting_or_done(small_call, small_thread)
    large_call.leave.set()
    large_thread.join(10)
    small_thread.join(10)
    assert isinstance(large_outcome[0], Cancelled) and small_outcome[0].held == 30 * MIB and memory.held == 90 * MIB


def test_a_growing_call_that_waits_shows_what_it_gave_back_in_the_gauge():
    metrics = Metrics()
    memory = DecodeMemory(100 * MIB, held_gauge=metrics.decode_memory_held)
    memory.lease(_Call()).reserve(40 * MIB)
    call = _Call()
    growing = memory.lease(call)
    growing.reserve(50 * MIB)
    outcome: list[Exception] = []

    def grow() -> None:
        try:
            growing.reserve(80 * MIB)
        except Cancelled as error:
            outcome.append(error)

    thread = threading.Thread(target=grow, daemon=True)
    thread.start()
    _waiting_or_done(call, thread)
    assert memory.held == 40 * MIB and metrics.registry.get_sample_value("explaind_decode_memory_bytes") == 40 * MIB
    call.leave.set()
    thread.join(10)
    assert outcome and growing.held == 0


def _float16_tensor(pixels: np.ndarray) -> common_pb2.Image:
    return common_pb2.Image(tensor=common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_FLOAT16, shape=pixels.shape, data=pixels.tobytes()))


def test_a_large_tensor_reserves_its_decode_and_gives_it_back_even_when_refused():
    memory = DecodeMemory(1024 * MIB)
    values = np.full((3, 1024, 1024), 0.5, dtype=np.float16)
    with PixelBudget(1 << 30, field="images", memory=memory.lease(_Call())) as budget:
        convert.decode_image(_float16_tensor(values), field="images[0]", budget=budget)
        assert memory.held == values.size * (2 + 4)  # its bytes and their float32 copy
    assert memory.held == 0
    values[0, 0, 0] = np.nan
    with pytest.raises(InvalidArgument, match="NaN"), PixelBudget(1 << 30, field="images", memory=memory.lease(_Call())) as budget:
        convert.decode_image(_float16_tensor(values), field="images[0]", budget=budget)
    assert memory.held == 0


def test_a_tensor_s_reservation_stops_at_the_largest_image_and_a_negative_side_reserves_nothing():
    # A shape is the caller's claim, read before the bytes are checked against it: one of
    # 3 x 10^6 x 10^6 reserves at most an image's 3 x MAX_IMAGE_SIDE^2 values (its decode is
    # refused right after), and two negative sides multiply to no size to wait for.
    from explaind.imaging import MAX_IMAGE_SIDE

    huge = common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_FLOAT16, shape=(3, 10**6, 10**6))
    assert convert.tensor_decode_bytes(huge, 4) == 3 * MAX_IMAGE_SIDE**2 * (2 + 4)
    negative = common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_UINT8, shape=(3, -4096, -4096))
    assert convert.tensor_decode_bytes(negative, 4) == 0


def test_an_uploaded_tensor_reserves_its_pixels_and_png_too():
    memory = DecodeMemory(1024 * MIB)
    values = np.full((3, 1024, 1024), 0.5, dtype=np.float16)
    sample = convert.sample_sets_pb2.Sample(image=_float16_tensor(values), label=0)
    with PixelBudget(1 << 30, field="samples", memory=memory.lease(_Call())) as budget:
        convert.new_sample(sample, field="samples[0]", budget=budget, jpeg_min_side=0)
        assert memory.held == values.size * (2 + 4 + 2)
    assert memory.held == 0


def test_a_large_image_file_reserves_by_its_header_size():
    from PIL import Image
    import io

    encoded = io.BytesIO()
    Image.new("RGB", (2048, 2048)).save(encoded, format="PNG")
    memory = DecodeMemory(1024 * MIB)
    with PixelBudget(1 << 30, field="images", memory=memory.lease(_Call())) as budget:
        convert.decode_image(common_pb2.Image(encoded=encoded.getvalue()), field="images[0]", budget=budget)
        assert memory.held == 2048 * 2048 * 26  # a lossless WebP with alpha, turned, took 25.2 a pixel
    assert memory.held == 0



def test_an_image_file_whose_caller_leaves_while_it_waits_ends_cancelled_not_invalid():
    from PIL import Image
    import io

    encoded = io.BytesIO()
    Image.new("RGB", (1024, 1024)).save(encoded, format="PNG")
    memory = DecodeMemory(64 * MIB)
    gone = _Call()
    gone.leave.set()
    with memory.lease(_Call()) as other:
        other.reserve(memory.capacity)
        with pytest.raises(Cancelled), PixelBudget(1 << 30, field="images", memory=memory.lease(gone)) as budget:
            convert.decode_image(common_pb2.Image(encoded=encoded.getvalue()), field="images[0]", budget=budget)
        assert memory.held == memory.capacity
    assert memory.held == 0

def test_small_images_take_nothing_and_many_calls_leave_nothing_held():
    memory = DecodeMemory(64 * MIB)
    small = common_pb2.Image(tensor=common_pb2.Tensor(dtype=common_pb2.DATA_TYPE_UINT8, shape=[64, 64, 3], data=bytes(64 * 64 * 3)))
    large = _float16_tensor(np.full((3, 1024, 1024), 2.0, dtype=np.float16))  # refused: out of [0, 1]
    for _ in range(50):
        with PixelBudget(1 << 30, field="images", memory=memory.lease(_Call())) as budget:
            convert.decode_image(small, field="images[0]", budget=budget)
            assert memory.held == 0
        with pytest.raises(InvalidArgument), PixelBudget(1 << 30, field="images", memory=memory.lease(_Call())) as budget:
            convert.decode_image(large, field="images[0]", budget=budget)
    assert memory.held == 0


@pytest.fixture
def engine(tmp_path, classifier_dir, request):
    """An engine serving the world classifier; with ``indirect`` parameters, these `[jobs]` keys."""
    from explaind.config import default_config
    from explaind.engine import Engine
    from explaind.store import SQLiteStore

    config = default_config().replace("classifier", path=str(classifier_dir)).replace("server", data_dir=str(tmp_path / "data"))
    config = config.replace("jobs", **getattr(request, "param", {}))
    engine = Engine(config, SQLiteStore(tmp_path / "data"), Metrics())
    engine.load()
    yield engine
    engine.close()


@pytest.mark.parametrize("partial_failure", [False, True])
def test_predict_gives_its_decode_memory_back_whether_its_images_decode_or_not(engine, partial_failure):
    from explaind.service.inference import InferenceServicer
    from explaind.v1 import inference_pb2

    servicer = InferenceServicer(engine, serving=lambda: True)
    good = _float16_tensor(np.full((3, 1024, 1024), 0.5, dtype=np.float16))
    bad = _float16_tensor(np.full((3, 1024, 1024), np.nan, dtype=np.float16))
    answer = servicer.Predict(inference_pb2.PredictRequest(images=[good], partial_failure=partial_failure), _Call())
    assert len(answer.predictions) == 1 and engine.decode_memory.held == 0
    if partial_failure:
        answer = servicer.Predict(inference_pb2.PredictRequest(images=[good, bad], partial_failure=True), _Call())
        assert answer.predictions[1].error.code == 3  # INVALID_ARGUMENT
    else:
        with pytest.raises(InvalidArgument, match="NaN"):
            servicer.Predict(inference_pb2.PredictRequest(images=[good, bad]), _Call())
    assert engine.decode_memory.held == 0


def test_an_upload_gives_its_decode_memory_back_whether_its_images_decode_or_not(engine):
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import sample_sets_pb2

    servicer = SampleSetServicer(engine)
    good = sample_sets_pb2.Sample(image=_float16_tensor(np.full((3, 1024, 1024), 0.5, dtype=np.float16)), label=0)
    bad = sample_sets_pb2.Sample(image=_float16_tensor(np.full((3, 1024, 1024), np.nan, dtype=np.float16)), label=0)
    with pytest.raises(InvalidArgument, match="NaN"):
        servicer.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="refused", samples=[good, bad]), _Call())
    assert engine.decode_memory.held == 0
    servicer.CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="kept", samples=[good]), _Call())
    assert engine.decode_memory.held == 0
    with pytest.raises(InvalidArgument, match="NaN"):
        servicer.AppendSamples(sample_sets_pb2.AppendSamplesRequest(sample_set_id="kept", samples=[bad]), _Call())
    assert engine.decode_memory.held == 0


def _store_a_large_sample(engine, sample_set_id: str) -> None:
    """A set of one stored 1024² image: 26 MiB to decode, over the unreserved 16."""
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import sample_sets_pb2

    large = sample_sets_pb2.Sample(image=_float16_tensor(np.full((3, 1024, 1024), 0.5, dtype=np.float16)), label=0)
    SampleSetServicer(engine).CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id=sample_set_id, samples=[large]), _Call())


def _until(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.01)


@contextlib.contextmanager
def _evaluation_waiting_for_room(engine, sample_set_id: str):
    """An evaluation of ``sample_set_id`` started while another lease holds the whole
    budget, once it waits for room: yields its job id; the other lease is given back after."""
    memory = engine.decode_memory
    with memory.lease(_Call()) as other:
        other.reserve(memory.capacity)
        job_id = engine.evaluate_sample_set(sample_set_id).record.job_id
        _until(lambda: memory._waiting, "waited for room")
        yield job_id


def test_a_jobs_stored_image_waits_for_room_and_decodes_once_it_is_given_back(engine):
    _store_a_large_sample(engine, "large")
    memory = engine.decode_memory
    with _evaluation_waiting_for_room(engine, "large") as job_id:
        assert not engine.jobs.get(job_id).done and memory.held == memory.capacity
    assert engine.jobs.wait(job_id, 60).record.state == "succeeded"
    assert memory.held == 0


def test_a_cancelled_job_waiting_for_room_ends_cancelled_holding_nothing(engine):
    _store_a_large_sample(engine, "large")
    _cancel_an_evaluation_waiting_for_room(engine, "large")


@pytest.mark.parametrize("engine", [{"max_run_seconds": 3.0}], indirect=True)
def test_a_job_waiting_for_room_past_its_run_time_limit_fails_as_a_job_past_it_does(engine):
    # It waited until it got room, however long past [jobs].max_run_seconds: the limit
    # that frees a worker from a runaway job held no worker waiting to decode.
    _store_a_large_sample(engine, "large")
    memory = engine.decode_memory
    with _evaluation_waiting_for_room(engine, "large") as job_id:
        ended = engine.jobs.wait(job_id, 30).record
        assert (ended.state, ended.error_code) == ("failed", "DEADLINE_EXCEEDED")
        assert ended.error_message.startswith("the job ran longer than the server allows an operation, 3 s ([jobs].max_run_seconds)")
        assert memory.held == memory.capacity and not memory._waiting
    assert memory.held == 0


@pytest.mark.parametrize("stops", ["at its deadline", "as its caller leaves"])
def test_an_inline_ranking_waits_for_room_only_while_its_caller_does(engine, stops):
    # Its stored samples waited for room with no deadline: past its caller's deadline, or
    # with its caller gone, it held its RPC's thread and its held call's slot for nobody.
    from explaind.engine.neuroinspect import NeuroInspectEngine
    from explaind.service.interceptors import HeldCalls
    from explaind.service.neuroinspect import NeuroInspectServicer
    from explaind.v1 import neuroinspect_pb2

    _store_a_large_sample(engine, "large")
    inspect = NeuroInspectEngine(engine)
    inspect.restore()
    servicer = NeuroInspectServicer(inspect, max_message_bytes=1 << 22, held_calls=HeldCalls(1))
    request = neuroinspect_pb2.RankMistakeNeuronsRequest(sample_set_id="large", class_index=0, execution=neuroinspect_pb2.EXECUTION_INLINE)
    call = _Call(remaining=0.5 if stops == "at its deadline" else None)
    memory = engine.decode_memory
    with memory.lease(_Call()) as other:
        other.reserve(memory.capacity)
        thread, outcome = _in_thread(lambda: servicer.RankMistakeNeurons(request, call))
        if stops == "as its caller leaves":
            _until(call.waiting.is_set, "asked whether its caller stays")
            call.leave.set()
        thread.join(30)
        assert not thread.is_alive(), "it still waits for room"
        if stops == "at its deadline":
            assert isinstance(outcome[0], DeadlineExceeded) and "found no room to decode in [server].max_decode_bytes" in str(outcome[0])
        else:
            assert isinstance(outcome[0], Cancelled) and str(outcome[0]) == "the call was cancelled; nothing was stored"  # no feature computed
        assert memory.held == memory.capacity and not memory._waiting and engine.jobs.list() == []  # nor run as an operation
    assert memory.held == 0


def _cancel_an_evaluation_waiting_for_room(engine, sample_set_id: str) -> None:
    """Starts an evaluation of ``sample_set_id`` while another lease holds the whole
    budget, and cancels it once it waits: it must end CANCELLED at once, waiting no more,
    and nothing be held once the other lease is given back."""
    memory = engine.decode_memory
    with _evaluation_waiting_for_room(engine, sample_set_id) as job_id:
        engine.jobs.cancel(job_id)
        ended = engine.jobs.wait(job_id, 60).record
        assert (ended.state, ended.error_code) == ("cancelled", "CANCELLED")
        assert memory.held == memory.capacity and not memory._waiting
    assert memory.held == 0


def test_a_cancelled_evaluation_waiting_for_room_to_draw_its_mistakes_ends_cancelled(engine):
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import sample_sets_pb2

    # One 1024² image labelled two ways: one of them is a mistake, drawn in the grid.
    image = _float16_tensor(np.full((3, 1024, 1024), 0.5, dtype=np.float16))
    samples = [sample_sets_pb2.Sample(image=image, label=label) for label in (0, 1)]
    SampleSetServicer(engine).CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="large", samples=samples), _Call())
    # Its features are cached by the first evaluation: the second decodes only its grid's image.
    assert engine.jobs.wait(engine.evaluate_sample_set("large").record.job_id, 60).record.state == "succeeded"
    _cancel_an_evaluation_waiting_for_room(engine, "large")


def test_a_feature_pass_trims_the_arenas_once_at_its_end_and_a_call_after_each_decode(engine, monkeypatch):
    from explaind import decode_memory

    trims: list[int] = []
    monkeypatch.setattr(decode_memory, "_MALLOC_TRIM", lambda: trims.append(engine.decode_memory.held))
    with engine.store.writing_blobs() as put:  # three stored 1024² images, 26 MiB each to decode: each reserves
        digests = [put(encode_png(np.full((1024, 1024, 3), value, dtype=np.uint8))) for value in (0, 128, 255)]
    for _ in engine._decoded_chunks([digests[:2], digests[2:]], engine.models.active, None):
        pass
    assert trims == [0]  # one trim (per image, it took 1.28x as long), once nothing is held
    with PixelBudget(1 << 30, field="images", memory=engine.decode_memory.lease(_Call())) as budget:
        convert.decode_image(_float16_tensor(np.full((3, 1024, 1024), 0.5, dtype=np.float16)), field="images[0]", budget=budget)
    assert trims == [0, 0]  # a call's lease trims as it is given back


@pytest.mark.parametrize(("options", "reduced", "expected"), [
    ({}, False, 2048 * 2048 * 26),  # whole, as any image file
    ({}, True, 1024 * 1024 * 26),  # at 1/2: [classifier].jpeg_reduced_decode, 2 x resize_size 512 the least side
    # A progressive JPEG's coefficients, 2 bytes a pixel and component, are kept whole before any pixel comes out.
    ({"progressive": True}, True, 1024 * 1024 * 26 + 2 * 3 * 2048 * 2048),
    ({"progressive": True}, False, 2048 * 2048 * 26 + 2 * 3 * 2048 * 2048),
    ({"progressive": True, "mode": "L"}, True, 1024 * 1024 * 26 + 2 * 1 * 2048 * 2048),
    ({"progressive": True, "mode": "CMYK"}, True, 1024 * 1024 * 26 + 2 * 4 * 2048 * 2048),
    # Each side padded to the MCU: 16 px, of 4:2:0's factor 2 (to 2064, not 32's 2080).
    ({"progressive": True, "size": 2050}, True, 1025 * 1025 * 26 + 2 * 3 * 2064 * 2064),
    ({"progressive": True, "size": 2050, "subsampling": 0}, True, 1025 * 1025 * 26 + 2 * 3 * 2056 * 2056),  # 4:4:4: 8 px
    # 4:2:2's factors 2 x 1, horizontally and vertically: 16 x 8 px, not 8 x 16 (2056 x 1040).
    ({"progressive": True, "size": (2050, 1030), "subsampling": 1}, False, 2050 * 1030 * 26 + 2 * 3 * 2064 * 1032),
])
def test_a_jpeg_reserves_by_the_size_it_decodes_to_and_a_progressive_one_its_coefficients_too(options, reduced, expected):
    # bench/decode_bytes_per_pixel.py: a 2048² JPEG decoded at 1/8 took 0.65 B/px of its
    # stored size, progressive 3.07 (4:2:0) to 8.07 (CMYK), against 26 reserved before.
    import io

    from PIL import Image

    from explaind.imaging import InputGeometry, decode_encoded

    options = dict(options)
    size, mode = options.pop("size", 2048), options.pop("mode", "RGB")
    width, height = (size, size) if isinstance(size, int) else size
    encoded = io.BytesIO()
    Image.new(mode, (width, height)).save(encoded, format="JPEG", **options)
    memory = DecodeMemory(1024 * MIB)
    geometry = InputGeometry(size=448, resize_size=512, jpeg_reduced_decode=reduced)
    with PixelBudget(1 << 30, field="images", memory=memory.lease(_Call())) as budget:
        decode_encoded(encoded.getvalue(), field="images[0]", geometry=geometry, budget=budget)
        assert (memory.held, budget.used) == (expected, width * height)  # the pixel limit counts the stored size
    assert memory.held == 0


def _crafted_jpeg(name: str):
    """bench/decode_bytes_per_pixel.py's JPEG rewrite or maker ``name``, or for
    "first_component_scanned_then_all" its one-component scan followed by the file's own."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the script's own imports (_cli) resolve as when it runs
    try:
        bench = importlib.import_module("decode_bytes_per_pixel")
    finally:
        sys.path.pop(0)
    if name == "first_component_scanned_then_all":
        return lambda data: bench.first_component_scanned_only(data)[:-2] + data[data.index(b"\xff\xda"):]
    return getattr(bench, name)


@pytest.mark.parametrize(("progressive", "cut"), [
    (True, "first_scan_only"),
    (False, "first_component_scanned_only"),
    (False, "first_component_scanned_then_all"),  # the first scan decides, not the last
])
def test_a_jpeg_of_one_scan_that_libjpeg_still_buffers_reserves_its_coefficients(progressive, cut):
    # libjpeg keeps every coefficient of a progressive frame, or of one whose first scan
    # leaves out a component, however many scans follow: at 4096² and 1/8 either held
    # 96 MiB while 6.5 MiB was reserved, below what is reserved at all.
    import io

    from PIL import Image

    from explaind.imaging import InputGeometry, decode_encoded

    encoded = io.BytesIO()
    Image.new("RGB", (2048, 2048)).save(encoded, format="JPEG", progressive=progressive, subsampling=0)
    memory = DecodeMemory(1024 * MIB)
    geometry = InputGeometry(size=224, resize_size=256, jpeg_reduced_decode=True)
    with PixelBudget(1 << 30, field="images", memory=memory.lease(_Call())) as budget:
        decode_encoded(_crafted_jpeg(cut)(encoded.getvalue()), field="images[0]", geometry=geometry, budget=budget)
        assert memory.held == 512 * 512 * 26 + 2 * 3 * 2048 * 2048  # at 1/4: 2 x resize_size 256 the least side


@pytest.mark.parametrize(("factors", "padded"), [
    ([(3, 3)] * 3, (2064, 2064)),  # 24-px MCUs: 86 of them a side, past 2048, which padding to 32 px left
    ([(3, 1), (1, 1), (1, 1)], (2064, 2048)),  # 24 x 8
    ([(1, 1), (1, 1), (4, 3)], (2048, 2064)),  # 32 x 24, of the last component's factors, 4 among them
])
def test_a_jpeg_libjpeg_buffers_pads_its_coefficients_to_the_mcu_of_its_sampling_factors(factors, padded):
    # libjpeg pads each component's blocks to a multiple of its sampling factor: with 3,
    # every 24 px; a 4096² file held 0.4% more than 32-px padding reserved.
    from explaind.imaging import InputGeometry, decode_encoded

    encoded = _crafted_jpeg("grey_jpeg")(2048, factors, interleaved=False)  # a scan for each component: buffered whole
    memory = DecodeMemory(1024 * MIB)
    geometry = InputGeometry(size=224, resize_size=256, jpeg_reduced_decode=True)
    with PixelBudget(1 << 30, field="images", memory=memory.lease(_Call())) as budget:
        pixels = decode_encoded(encoded, field="images[0]", geometry=geometry, budget=budget)
        assert memory.held == 512 * 512 * 26 + 2 * len(factors) * padded[0] * padded[1]  # at 1/4: 2 x resize_size 256 the least side
    assert np.allclose(pixels.numpy(), 128 / 255, atol=1e-6)  # mid-grey: the file decodes as libjpeg read it


def test_a_jpeg_of_sampling_factors_libjpeg_refuses_is_refused_as_it_is_not_a_reservation_s_error():
    # Factors of 0 gave no MCU to pad to (ZeroDivisionError); libjpeg takes 1 to 4 only.
    from explaind.imaging import decode_pixels

    data = _crafted_jpeg("grey_jpeg")(64, [(1, 1)] * 3, interleaved=False)
    frame = data.index(b"\xff\xc0")
    components = slice(frame + 10, frame + 19)  # each one's identifier, sampling factors 1x1 (11) and table
    data = data[:components.start] + data[components].replace(b"\x11", b"\x00") + data[components.stop:]
    memory = DecodeMemory(1024 * MIB)
    with PixelBudget(1 << 30, field="images", memory=memory.lease(_Call())) as budget:
        with pytest.raises(InvalidArgument, match="cannot decode image bytes") as refused:
            decode_pixels(data, field="images[0]", budget=budget)
    assert "ZeroDivisionError" not in str(refused.value) and memory.held == 0


def test_features_computed_for_a_call_wait_for_room_as_it_does_in_every_batch(engine):
    # The first batch's decodes alone were tied to the call: a later one waited with no
    # deadline, for nobody. A small image (no reservation), then a 1024² one, a batch each.
    from explaind.service.sample_sets import SampleSetServicer
    from explaind.v1 import sample_sets_pb2

    samples = [sample_sets_pb2.Sample(image=_float16_tensor(np.full((3, side, side), 0.5, dtype=np.float16)), label=0) for side in (64, 1024)]
    SampleSetServicer(engine).CreateSampleSet(sample_sets_pb2.CreateSampleSetRequest(sample_set_id="mixed", samples=samples), _Call())
    memory = engine.decode_memory
    with memory.lease(_Call()) as other:
        other.reserve(memory.capacity)
        thread, outcome = _in_thread(lambda: engine.sample_set_features("mixed", batch_size=1, call=_Call(remaining=0.5)))
        thread.join(30)
        assert not thread.is_alive(), "the second batch's decode still waits for room"
        assert isinstance(outcome[0], DeadlineExceeded) and "found no room to decode in [server].max_decode_bytes" in str(outcome[0])
        assert str(outcome[0]).endswith("; the features of the 1 image computed before it stopped are cached: a retry on the same model computes only the other 1")
        # Again: the small image's features are cached, and the large one's wait, its first batch's, gives up with none computed.
        thread, outcome = _in_thread(lambda: engine.sample_set_features("mixed", batch_size=1, call=_Call(remaining=0.5)))
        thread.join(30)
        assert isinstance(outcome[0], DeadlineExceeded) and str(outcome[0]).endswith("before its deadline; nothing was stored")
    assert memory.held == 0

"""Predict's partial_failure: an image that fails alone gets Prediction.error, the others
their answers; request-level faults and requests without it fail as a whole. And the
samples of an operation the model gives unusable outputs for, listed as a call's images."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from conftest import DIVIDES_BY_MEAN_CLASSIFIER
from google.rpc import error_details_pb2
from PIL import Image

from explaind.client import AsyncClient, Client, FailedPreconditionError, InvalidArgumentError, ResourceExhaustedError, UnimplementedError
from explaind.v1 import common_pb2, inference_pb2, inference_pb2_grpc


def _png(shade: int, side: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), shade, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# divides_by_mean gives NaN logits for a black image (it divides by its mean pixel, 0).
GOOD, BLACK, CORRUPT = _png(90), _png(0), _png(90)[:40]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from explaind.config import default_config
    from explaind.service import ExplaindServer

    data = tmp_path_factory.mktemp("partial") / "data"
    config = (default_config().replace("classifier", **DIVIDES_BY_MEAN_CLASSIFIER).replace("clip", path="").replace("diffusion", path="")
              .replace("server", port=0, metrics_port=0, data_dir=str(data), data_dir_reserve_bytes=1 << 20, max_pixels_per_request=64 * 64)
              .replace("batching", max_images_per_request=16, max_batch_size=2))  # the SDK sends 2 images a request
    server = ExplaindServer(config)
    server.start()
    server.load_models()
    yield server
    server.stop(0)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def _predict(stub, *encoded: bytes, **options) -> inference_pb2.PredictResponse:
    return stub.Predict(inference_pb2.PredictRequest(images=[common_pb2.Image(encoded=e) for e in encoded], top_k=2, **options), timeout=30)


def _errors_counted(server, code: str) -> float:
    return server.metrics.registry.get_sample_value("explaind_predict_image_errors_total", {"code": code})


def test_each_failing_image_gets_its_own_error_and_the_others_their_answers(server, stub):
    whole = _predict(stub, GOOD, GOOD)
    before = {code: _errors_counted(server, code) for code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION")}
    predicted = server.metrics.registry.get_sample_value("explaind_predicted_images_total")
    response = _predict(stub, GOOD, CORRUPT, BLACK, GOOD, partial_failure=True, return_features=True)
    first, corrupt, black, last = response.predictions
    for answered in (first, last):
        assert answered.labels == whole.predictions[0].labels and answered.probabilities == whole.predictions[0].probabilities
        assert answered.error.code == 0
    assert corrupt.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and corrupt.error.message.startswith("images[1].encoded: ")
    violation = error_details_pb2.BadRequest()
    assert corrupt.error.details[0].Unpack(violation) and violation.field_violations[0].field == "images[1].encoded"
    assert black.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert black.error.message.startswith("images[2]: the served classifier's logits of 1 image of the request hold NaN"), black.error.message
    # Answered on its own: "send the request without it" would change nothing.
    assert black.error.message.endswith("rules out every class on its image; only a mended model answers it"), black.error.message
    info, failure = error_details_pb2.ErrorInfo(), error_details_pb2.PreconditionFailure()
    assert black.error.details[0].Unpack(info) and info.metadata["field"] == "images[2]" and info.domain == "explaind.v1"
    assert black.error.details[1].Unpack(failure) and [v.subject for v in failure.violations] == ["images[2]"]
    for failed in (corrupt, black):
        assert not failed.labels and not failed.class_indices and not failed.probabilities
    features = np.frombuffer(response.features.data, np.float32).reshape(tuple(response.features.shape))
    assert features.shape == (4, 4)
    assert np.isnan(features[1:3]).all() and np.isfinite(features[[0, 3]]).all()
    assert _errors_counted(server, "INVALID_ARGUMENT") == before["INVALID_ARGUMENT"] + 1
    assert _errors_counted(server, "FAILED_PRECONDITION") == before["FAILED_PRECONDITION"] + 1
    assert server.metrics.registry.get_sample_value("explaind_predicted_images_total") == predicted + 2  # the answered ones


def test_a_request_whose_every_image_fails_is_answered_ok_without_running_the_model(server, stub, monkeypatch):
    submitted = []
    monkeypatch.setattr(server.engine, "submit_predict", lambda *args, **kwargs: submitted.append(args))
    response = _predict(stub, CORRUPT, b"not an image", partial_failure=True, return_features=True)
    assert [p.error.code for p in response.predictions] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 2
    assert "images[1].encoded" in response.predictions[1].error.message
    assert response.model_version == server.engine.models.active.version
    assert tuple(response.features.shape) == (2, 4) and np.isnan(np.frombuffer(response.features.data, np.float32)).all()
    assert submitted == []


def test_only_the_images_that_decode_are_decoded_once_and_sent_to_the_batcher(server, stub, monkeypatch):
    from explaind.service import convert

    decoded, submitted = [], []
    decode, submit = convert.decode_image, server.engine.submit_predict
    monkeypatch.setattr(convert, "decode_image", lambda image, **kwargs: decoded.append(kwargs["field"]) or decode(image, **kwargs))
    monkeypatch.setattr(server.engine, "submit_predict", lambda images, **kwargs: submitted.append(len(images)) or submit(images, **kwargs))
    response = _predict(stub, CORRUPT, GOOD, CORRUPT, partial_failure=True)
    assert decoded == ["images[0]", "images[1]", "images[2]"]
    assert submitted == [1]
    assert [bool(p.labels) for p in response.predictions] == [False, True, False]


def test_request_level_faults_still_fail_the_whole_call_with_partial_failure(stub):
    cases = {
        "no images": ((), {}, "images"),
        "too many": ((GOOD,) * 17, {}, "images"),
        # Four 32x32 images fill the 64x64 budget: the fifth passes it, whatever it is.
        "pixel budget": ((_png(90, 32),) * 4 + (CORRUPT, _png(90, 32)), {}, "images: the images decode to more than"),
        "top_k": ((CORRUPT,), {"top_k": 9}, "top_k"),
    }
    for name, (images, options, message) in cases.items():
        request = inference_pb2.PredictRequest(images=[common_pb2.Image(encoded=e) for e in images], partial_failure=True)
        request.top_k = options.get("top_k", 2)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert refused.value.details().startswith(message), (name, refused.value.details())


def test_without_partial_failure_one_failing_image_still_fails_the_call(stub):
    for image, code in ((CORRUPT, grpc.StatusCode.INVALID_ARGUMENT), (BLACK, grpc.StatusCode.FAILED_PRECONDITION)):
        with pytest.raises(grpc.RpcError) as refused:
            _predict(stub, GOOD, image)
        assert refused.value.code() == code


def _status_of(refused: grpc.RpcError):
    from google.rpc import status_pb2

    return status_pb2.Status.FromString(dict(refused.trailing_metadata())["grpc-status-details-bin"])


def test_a_whole_call_refused_for_unusable_logits_lists_its_images_as_precondition_violations(stub):
    # Before, the images were named in the message alone: clients parsed its text.
    with pytest.raises(grpc.RpcError) as refused:
        _predict(stub, GOOD, BLACK, GOOD, BLACK)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "(images[1], images[3]): " in refused.value.details()  # the message as it was
    info, failure = error_details_pb2.ErrorInfo(), error_details_pb2.PreconditionFailure()
    details = _status_of(refused.value).details
    assert len(details) == 2 and details[0].Unpack(info) and info.metadata["field"] == "images"
    assert details[1].Unpack(failure)
    assert [(v.type, v.subject, v.description) for v in failure.violations] == [("UNUSABLE_LOGITS", "images[1]", ""), ("UNUSABLE_LOGITS", "images[3]", "")]


def test_the_sdk_reads_the_refused_images_of_a_later_request_from_the_violations(server):
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        with pytest.raises(FailedPreconditionError) as refused:
            client.predict([GOOD, GOOD, BLACK, BLACK, GOOD], top_k=2, max_in_flight=1)  # requests of 2: the second fails
    error = refused.value
    # Numbered within the request, as the field and the message are, with its offset beside them.
    assert error.field == "images" and error.request_offset == 2
    assert error.precondition_violations == [("UNUSABLE_LOGITS", "images[0]", ""), ("UNUSABLE_LOGITS", "images[1]", "")]
    assert error.__notes__ == ["the failing request began at item 2 of 5: [i] there is item 2 + i here"]


def test_the_server_lists_the_capability(stub):
    assert "predict_partial_failure" in stub.GetModelMetadata(inference_pb2.GetModelMetadataRequest(), timeout=30).capabilities


@pytest.mark.parametrize("max_in_flight", [1, 3])
def test_the_sdk_names_each_failed_image_by_its_index_in_the_callers_list_across_requests(server, max_in_flight):
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        whole = client.predict([GOOD], top_k=2)[0]
        predictions = client.predict([GOOD, GOOD, GOOD, CORRUPT, BLACK], top_k=2, partial_failure=True, return_features=True,
                                     max_in_flight=max_in_flight)
    assert [p.labels for p in predictions[:3]] == [whole.labels] * 3 and all(p.error is None for p in predictions[:3])
    corrupt, black = predictions[3:]
    # The server named them images[1] and images[0] of their requests (2 images each).
    assert isinstance(corrupt.error, InvalidArgumentError) and corrupt.error.field == "images[3].encoded"
    assert corrupt.error.details.startswith("images[3].encoded: ")
    assert isinstance(black.error, FailedPreconditionError) and black.error.field == "images[4]"
    assert black.error.details.startswith("images[4]: ") and "(images[4])" in black.error.details and "images[0]" not in black.error.details
    assert black.error.precondition_violations == [("UNUSABLE_LOGITS", "images[4]", "")]  # renamed as its field is
    for failed in (corrupt, black):
        assert failed.labels == [] and failed.class_indices == [] and failed.probabilities == []
        assert failed.features.shape == (4,) and np.isnan(failed.features).all()
        with pytest.raises(type(failed.error)) as raised:
            failed.label
        assert raised.value is failed.error
        with pytest.raises(type(failed.error)):
            failed.probability
        assert repr(failed).endswith(f", error={failed.error!r})")
    assert predictions[0].label == whole.label and repr(predictions[0]) == repr(whole).replace("features=None", "features=array(shape=(4,), dtype=float32)")


def test_the_async_client_takes_partial_failure_too(server):
    import asyncio

    async def predict():
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            return await client.predict([CORRUPT, GOOD], partial_failure=True)

    corrupt, good = asyncio.run(predict())
    assert isinstance(corrupt.error, InvalidArgumentError) and corrupt.error.field == "images[0].encoded" and good.error is None and good.labels


def test_the_sdk_refuses_partial_failure_up_front_on_a_server_without_the_capability(server, monkeypatch):
    from explaind.service import convert

    monkeypatch.setattr(convert, "CAPABILITIES", tuple(c for c in convert.CAPABILITIES if c != "predict_partial_failure"))
    sent = server.metrics.registry.get_sample_value("explaind_rpcs_started_total", {"service": "explaind.v1.InferenceService", "method": "Predict"})
    asked = server.metrics.registry.get_sample_value("explaind_rpcs_started_total", {"service": "explaind.v1.InferenceService", "method": "GetModelMetadata"}) or 0
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        for refusal in (1, 2):  # asked once each: by a new client, and again by one that kept an answer without it
            with pytest.raises(UnimplementedError, match="does not honour partial_failure .*'predict_partial_failure'"):
                client.predict([GOOD, CORRUPT], partial_failure=True)
            assert server.metrics.registry.get_sample_value(
                "explaind_rpcs_started_total", {"service": "explaind.v1.InferenceService", "method": "GetModelMetadata"}) == asked + refusal
        with pytest.raises(InvalidArgumentError, match=r"images\[1\]"):  # without it, as ever
            client.predict([GOOD, CORRUPT])
    assert server.metrics.registry.get_sample_value("explaind_rpcs_started_total", {"service": "explaind.v1.InferenceService", "method": "Predict"}) == sent + 1


def _predicts_started(server) -> float:
    return server.metrics.registry.get_sample_value("explaind_rpcs_started_total", {"service": "explaind.v1.InferenceService", "method": "Predict"})


def test_the_sdk_notices_a_server_upgraded_to_partial_failure_behind_its_target(server, monkeypatch):
    from explaind.service import convert

    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        monkeypatch.setattr(convert, "CAPABILITIES", tuple(c for c in convert.CAPABILITIES if c != "predict_partial_failure"))
        with pytest.raises(UnimplementedError):
            client.predict([GOOD, CORRUPT], partial_failure=True)
        monkeypatch.undo()  # upgraded: the client asks again rather than refuse for its whole life
        good, corrupt = client.predict([GOOD, CORRUPT], partial_failure=True)
    assert good.error is None and isinstance(corrupt.error, InvalidArgumentError)


def _ignoring_partial_failure(servicer, request, context, geometry, budget):
    """InferenceServicer._predict_each as an older release answers: the request as if
    partial_failure were not set."""
    plain = inference_pb2.PredictRequest()
    plain.CopyFrom(request)
    plain.partial_failure = False
    return servicer.Predict(plain, context)


def test_a_request_refused_whole_for_its_images_together_asks_the_server_nothing_more(server, monkeypatch):
    # Only a request failed whole for one image of its own tells of a server ignoring
    # partial_failure; one refused for the field images (a pixel limit) is raised as it came.
    from explaind.errors import InvalidArgument
    from explaind.service.inference import InferenceServicer

    def refused(servicer, request, context, geometry, budget):
        raise InvalidArgument("the images decode to more than the server allows a request", field="images")

    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        client.predict([GOOD], partial_failure=True)  # its capabilities kept
        asked = _metadata_asked(server)
        monkeypatch.setattr(InferenceServicer, "_predict_each", refused)
        with pytest.raises(InvalidArgumentError) as raised:
            client.predict([GOOD, GOOD], partial_failure=True)
    assert raised.value.field == "images" and _metadata_asked(server) == asked


def _metadata_asked(server) -> float:
    return server.metrics.registry.get_sample_value("explaind_rpcs_started_total", {"service": "explaind.v1.InferenceService", "method": "GetModelMetadata"}) or 0

@pytest.mark.parametrize("still_listed", [False, True])
def test_the_sdk_notices_a_server_downgraded_behind_its_target_by_a_request_failed_whole_for_an_image(server, monkeypatch, still_listed):
    from explaind.service import convert
    from explaind.service.inference import InferenceServicer

    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        assert client.predict([GOOD], partial_failure=True)[0].error is None  # its capabilities kept
        monkeypatch.setattr(InferenceServicer, "_predict_each", _ignoring_partial_failure)
        if not still_listed:
            monkeypatch.setattr(convert, "CAPABILITIES", tuple(c for c in convert.CAPABILITIES if c != "predict_partial_failure"))
        with pytest.raises(UnimplementedError if not still_listed else InvalidArgumentError) as raised:
            client.predict([GOOD, CORRUPT], partial_failure=True)
        if still_listed:  # a server that says it honours it: its error as it came
            assert raised.value.field == "images[1].encoded"
            return
        assert isinstance(raised.value.__cause__, InvalidArgumentError) and raised.value.__cause__.field == "images[1].encoded"
        sent = _predicts_started(server)
        with pytest.raises(UnimplementedError):  # up front from then on
            client.predict([GOOD, CORRUPT], partial_failure=True)
        assert _predicts_started(server) == sent


def test_the_sdk_notices_a_downgraded_server_by_a_later_request_refused_for_the_images_it_lists(server, monkeypatch):
    # Unusable logits fail a request ignoring partial_failure under the field images, the
    # images listed as its precondition violations: those tell, not the field.
    from explaind.service import convert
    from explaind.service.inference import InferenceServicer

    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        client.predict([GOOD], partial_failure=True)
        monkeypatch.setattr(InferenceServicer, "_predict_each", _ignoring_partial_failure)
        monkeypatch.setattr(convert, "CAPABILITIES", tuple(c for c in convert.CAPABILITIES if c != "predict_partial_failure"))
        with pytest.raises(UnimplementedError) as raised:
            client.predict([GOOD, GOOD, GOOD, BLACK], partial_failure=True, max_in_flight=1)  # requests of 2: the second fails
    cause = raised.value.__cause__
    assert isinstance(cause, FailedPreconditionError) and cause.field == "images" and cause.request_offset == 2
    assert cause.precondition_violations == [("UNUSABLE_LOGITS", "images[1]", "")]


def test_a_request_failed_whole_for_an_image_is_raised_as_it_came_where_the_capabilities_cannot_be_asked_again(server, monkeypatch):
    from explaind.client import UnavailableError
    from explaind.service.inference import InferenceServicer

    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        client.predict([GOOD], partial_failure=True)
        monkeypatch.setattr(InferenceServicer, "_predict_each", _ignoring_partial_failure)
        monkeypatch.setattr(client, "model_metadata", lambda **kwargs: (_ for _ in ()).throw(UnavailableError("loading its models")))
        with pytest.raises(InvalidArgumentError) as raised:  # not the metadata's UnavailableError
            client.predict([GOOD, CORRUPT], partial_failure=True)
    assert raised.value.field == "images[1].encoded" and raised.value.__suppress_context__  # its traceback without the metadata's


def test_the_cli_names_keep_going_where_the_server_lacks_the_capability(server, monkeypatch, tmp_path, capsys):
    from explaind.client.cli import main as cli_main
    from explaind.service import convert

    monkeypatch.setattr(convert, "CAPABILITIES", tuple(c for c in convert.CAPABILITIES if c != "predict_partial_failure"))
    (tmp_path / "good.png").write_bytes(GOOD)
    assert cli_main(["--target", f"127.0.0.1:{server.port}", "predict", str(tmp_path / "good.png"), "--keep-going"]) == 1
    out, err = capsys.readouterr()
    # The SDK's refusal told a CLI user to "predict without partial_failure", no option of the CLI.
    assert out == "" and err.startswith("error: --keep-going: the server at ") and err.rstrip().endswith("run without --keep-going")
    assert "partial_failure" not in err.replace("'predict_partial_failure'", "")
    # Without --keep-going, such a server answers predict as ever.
    assert cli_main(["--target", f"127.0.0.1:{server.port}", "predict", str(tmp_path / "good.png")]) == 0
    out, err = capsys.readouterr()
    assert "good.png" in out and err == ""


def test_the_cli_keeps_going_past_failing_files_naming_them_and_exits_3(server, tmp_path, capsys):
    import json

    from explaind.client.cli import main as cli_main

    files = {"good.png": GOOD, "corrupt.png": CORRUPT, "black.png": BLACK}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    good, corrupt, black = (str(tmp_path / name) for name in files)
    target = ["--target", f"127.0.0.1:{server.port}"]
    # 3: some printed, others failed; 1 is a failure's with nothing answered (below).
    assert cli_main([*target, "predict", good, corrupt, black, "--keep-going", "--top-k", "2"]) == 3
    out, err = capsys.readouterr()
    assert out.startswith(good + "  ") and len(out.splitlines()) == 1
    assert err.splitlines() == [line for line in err.splitlines() if line.startswith("error: ")]
    assert err.startswith(f"error: {corrupt}: INVALID_ARGUMENT: images[1].encoded: ")
    assert f"error: {black}: FAILED_PRECONDITION: images[2]: the served classifier's logits" in err
    assert cli_main([*target, "predict", good, corrupt, black, "--keep-going", "--top-k", "2", "--json"]) == 3
    entries = json.loads(capsys.readouterr().out)
    assert [entry["image"] for entry in entries] == [good, corrupt, black] and len(entries[0]["labels"]) == 2
    assert entries[1]["error"]["code"] == "INVALID_ARGUMENT" and entries[1]["error"]["field"] == "images[1].encoded"
    assert entries[2]["error"] == {"code": "FAILED_PRECONDITION", "field": "images[2]", "message": entries[2]["error"]["message"],
                                   "precondition_violations": [{"type": "UNUSABLE_LOGITS", "subject": "images[2]", "description": ""}], "reason": None, "quota_violations": []}
    assert "labels" not in entries[1] and "labels" not in entries[2]
    assert cli_main([*target, "predict", good, good, "--keep-going"]) == 0
    # Without it, the first failing file fails the command, as ever.
    assert cli_main([*target, "predict", good, corrupt]) == 1
    out, err = capsys.readouterr()
    assert out.count(good) == 2 and out.count("\n") == 2  # only the two good ones of the --keep-going run
    assert f"that is file {corrupt}" in err
    (tmp_path / "black2.png").write_bytes(BLACK)
    assert cli_main([*target, "predict", good, good, black, str(tmp_path / "black2.png")]) == 1  # the second request of two fails
    assert f"  those are files {black}, {tmp_path / 'black2.png'}" in capsys.readouterr().err.splitlines()


def test_the_cli_keeping_going_past_every_file_exits_1_as_a_failure_does(server, tmp_path, capsys):
    import json

    from explaind.client.cli import main as cli_main

    (tmp_path / "corrupt.png").write_bytes(CORRUPT)
    (tmp_path / "black.png").write_bytes(BLACK)
    files = [str(tmp_path / "corrupt.png"), str(tmp_path / "black.png")]
    target = ["--target", f"127.0.0.1:{server.port}"]
    assert cli_main([*target, "predict", *files, "--keep-going"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 2
    assert cli_main([*target, "predict", *files, "--keep-going", "--json"]) == 1
    assert [entry["error"]["code"] for entry in json.loads(capsys.readouterr().out)] == ["INVALID_ARGUMENT", "FAILED_PRECONDITION"]
    assert cli_main([*target, "predict", *files]) == 1  # as without --keep-going


def test_a_batch_answers_a_partial_failure_request_with_its_unusable_rows_and_refuses_a_plain_one_batched_with_it():
    import torch

    from explaind.engine import core
    from explaind.errors import FailedPrecondition

    logits = torch.tensor([[1.0, 2.0, 0.0], [float("nan"), 0.0, 0.0], [0.5, 0.0, 1.0],
                           [float("-inf")] * 3, [0.0, 1.0, 2.0], [float("inf"), 0.0, 0.0]])
    forward = core._BatchForward(object(), logits, None)
    with_partial, plain = core.PredictOptions(2, False, partial_failure=True), core.PredictOptions(2, False)
    partial, answered, refused = core._split_outputs(forward, [4, 1, 1], [with_partial, plain, plain])
    assert partial.unusable_rows == (1, 3) and partial.class_indices.tolist()[0] == [1, 0] and partial.class_indices.tolist()[2] == [2, 0]
    assert answered.unusable_rows == () and answered.class_indices.tolist() == [[2, 1]]
    # A plain request with a row of +inf is refused whole, naming it; those batched with it are answered.
    assert isinstance(refused, FailedPrecondition) and "(images[0])" in str(refused) and refused.field == "images"


class _Context:
    """What Predict asks of a gRPC context, for calling the servicer without a channel."""

    def peer(self) -> str:
        return "ipv4:192.0.2.7:5000"

    def time_remaining(self) -> None:
        return None

    def add_callback(self, callback) -> bool:
        return True


def test_a_partially_failed_call_is_logged_with_its_peer_and_first_error_as_a_refused_one_is(server, caplog):
    import logging

    from explaind.service.auth import calling_as
    from explaind.service.inference import InferenceServicer

    servicer = InferenceServicer(server.engine, serving=lambda: True)  # its own once-a-minute log, not yet used
    request = inference_pb2.PredictRequest(images=[common_pb2.Image(encoded=e) for e in (GOOD, CORRUPT, BLACK)], top_k=2, partial_failure=True)
    with caplog.at_level(logging.INFO), calling_as("batch-job"):
        servicer.Predict(request, _Context())
        servicer.Predict(request, _Context())  # within the minute: left out, counted on the next line
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("answered explaind.v1.InferenceService/Predict")]
    assert lines == [lines[0]]
    assert "from ipv4:192.0.2.7:5000 (caller batch-job) with 2 of 3 images failed, the first INVALID_ARGUMENT: images[1].encoded: " in lines[0]


def test_a_failed_images_decoded_pixels_are_not_kept_while_the_others_run(server, monkeypatch):
    import tracemalloc

    from explaind.service.inference import InferenceServicer

    # Integer greyscale past 65535 fails only once its pixels are decoded, at 4 bytes a pixel.
    buffer = io.BytesIO()
    Image.fromarray(np.full((512, 512), 70000, np.int32), mode="I").save(buffer, format="TIFF")
    monkeypatch.setattr(server.engine, "config", server.engine.config.replace("server", max_pixels_per_request=8 * 512 * 512))
    held = []
    submit = server.engine.submit_predict
    monkeypatch.setattr(server.engine, "submit_predict", lambda images, **kwargs: held.append(tracemalloc.get_traced_memory()[0]) or submit(images, **kwargs))
    request = inference_pb2.PredictRequest(images=[common_pb2.Image(encoded=e) for e in (buffer.getvalue(),) * 4 + (GOOD,)], top_k=2, partial_failure=True)
    tracemalloc.start()
    try:
        response = InferenceServicer(server.engine, serving=lambda: True).Predict(request, _Context())
    finally:
        tracemalloc.stop()
    assert [p.error.code for p in response.predictions] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 4 + [0]
    assert "must lie in [0, 65535]" in response.predictions[0].error.message
    assert held[0] < 512 * 512 * 4  # less than one failed image's pixels, of the four


@pytest.mark.parametrize("partial_failure", [True, False])
def test_the_sdk_asks_the_servers_limits_and_capabilities_within_the_predicts_timeout(server, monkeypatch, partial_failure):
    # With the client's timeout instead, predict(timeout=1) on a server still loading its
    # models waited the client's 30 s for GetModelMetadata before its first request. That
    # request has what the ask left of the 7 s, the next a whole 7.
    asked = []
    call = Client._call

    def recorded(client, service, method, request, **kwargs):
        asked.append((method, kwargs.get("timeout")))
        return call(client, service, method, request, **kwargs)

    monkeypatch.setattr(Client, "_call", recorded)
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        client.predict([GOOD, GOOD, GOOD], top_k=2, timeout=7, partial_failure=partial_failure)
    assert asked[0] == ("GetModelMetadata", 7) and all(6 < timeout <= 7 for _, timeout in asked)


def test_predictions_of_failed_images_compare_by_value(server):
    import copy
    import pickle

    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        first = client.predict([GOOD, CORRUPT, BLACK], top_k=2, partial_failure=True, return_features=True)
        again = client.predict([GOOD, CORRUPT, BLACK], top_k=2, partial_failure=True, return_features=True)
    failed = first[1]
    # NaN features and an exception compared by identity made it unequal even to itself.
    assert failed == failed and first == again
    assert pickle.loads(pickle.dumps(first)) == first and copy.deepcopy(failed) == failed
    assert first[1] != first[2] and first[0] != first[1]
    renamed = copy.deepcopy(failed)
    renamed.error.field_violations[0] = ("images[9].encoded", renamed.error.field_violations[0][1])
    assert renamed != failed


def test_each_access_of_a_failed_predictions_label_raises_with_a_traceback_of_its_own():
    import traceback

    from explaind.client import Prediction

    failed = Prediction([], [], [], error=InvalidArgumentError("images[3].encoded: bytes are not an image", field="images[3].encoded"))
    depths = []
    for read in ("label", "probability", "label"):
        with pytest.raises(InvalidArgumentError) as raised:
            getattr(failed, read)
        assert raised.value is failed.error
        depths.append(len(traceback.extract_tb(raised.value.__traceback__)))
    # Raised as kept, each access added its frames to the earlier ones': 3, 6, 9 deep.
    assert depths[0] == depths[1] == depths[2]


def test_a_call_in_another_thread_that_finds_the_limits_asked_finds_the_capabilities_too(server):
    from explaind.client._client import PARTIAL_FAILURE_CAPABILITY

    seen = []

    class Observed(Client):
        def __setattr__(self, name, value):
            super().__setattr__(name, value)
            if name == "_limits" and value is not None:  # where another thread's predict may look, as _limits is set
                seen.append((PARTIAL_FAILURE_CAPABILITY in self._server_capabilities(None), self._max_batch_size))

    with Observed(f"127.0.0.1:{server.port}", timeout=30) as client:
        client.predict([GOOD, CORRUPT], top_k=2, partial_failure=True)
    # Set before the capabilities, _limits told such a call "does not honour partial_failure".
    assert seen == [(True, 2)]


def test_the_cli_prints_a_file_name_that_is_not_utf8_with_its_bytes_escaped(server, tmp_path, capsys):
    import os

    from explaind.client.cli import main as cli_main

    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")  # Latin-1, as an older camera or archive names it
    with open(odd, "wb") as file:
        file.write(GOOD)
    for keep_going in ([], ["--keep-going"]):
        # capsys's stdout is strict UTF-8, as a terminal's in a UTF-8 locale: the name's lone surrogate was a traceback.
        assert cli_main(["--target", f"127.0.0.1:{server.port}", "predict", os.fsdecode(odd), "--top-k", "2", *keep_going]) == 0
        assert capsys.readouterr().out.startswith(f"{tmp_path}/caf\\xe9.png  ")


def test_an_image_error_with_a_code_and_no_message_is_an_error_named_by_its_code(server, monkeypatch):
    # A google.rpc.Status needs no message: the code alone marks the image failed.
    from explaind.service import convert

    error_status = convert.error_status

    def without_message(error):
        status = error_status(error)
        status.message = ""
        return status

    monkeypatch.setattr(convert, "error_status", without_message)
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        good, corrupt = client.predict([GOOD, CORRUPT], partial_failure=True)
    assert good.error is None and isinstance(corrupt.error, InvalidArgumentError)
    assert corrupt.error.details == "INVALID_ARGUMENT" and corrupt.error.field == "images[1].encoded"


def test_an_operation_failed_for_samples_the_model_gives_unusable_outputs_lists_them_as_precondition_violations(server):
    # Its stored error kept the field alone: the samples were named in its message only,
    # and the SDK's precondition_violations of an operation's error was always empty.
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        client.create_sample_set([GOOD, BLACK, GOOD, BLACK], [0, 0, 1, 1], sample_set_id="blackened")
        operation = client.evaluate_sample_set("blackened").wait(60)  # WaitOperation
        for error in (operation.error, operation.refresh().error):  # and GetOperation
            assert isinstance(error, FailedPreconditionError) and error.field == "sample_set_id"
            assert "(sample_index 1, 3)" in error.details
            assert error.precondition_violations == [("UNUSABLE_FEATURES", "samples[1]", ""), ("UNUSABLE_FEATURES", "samples[3]", "")]


def test_the_cli_json_of_an_operation_failed_for_unusable_samples_lists_them_and_its_text_names_them_once(server, capsys):
    # The JSON of `operations get/wait --json` gave the error's code and message alone: a
    # script had to parse "(sample_index 1, 3)" out of the text to learn which samples failed.
    import json

    from explaind.client.cli import main as cli_main

    target = ["--target", f"127.0.0.1:{server.port}"]
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        client.create_sample_set([GOOD, BLACK, GOOD, BLACK], [0, 0, 1, 1], sample_set_id="blackened-cli")
    unusable = [{"type": "UNUSABLE_FEATURES", "subject": f"samples[{i}]", "description": ""} for i in (1, 3)]
    for argv in (["evaluate", "blackened-cli"], ["rank", "blackened-cli", "--class", "0"]):  # a job's failure, an inline refusal
        assert cli_main([*target, *argv]) == 1
        err = capsys.readouterr().err
        assert err.count("sample_index 1, 3") == 1 and "error: FAILED_PRECONDITION: sample_set_id: " in err, err
    assert cli_main([*target, "evaluate", "blackened-cli", "--no-wait", "--json"]) == 0
    name = json.loads(capsys.readouterr().out)["name"]
    for action, code in (("wait", 1), ("get", 0)):
        assert cli_main([*target, "operations", action, name, "--json"]) == code
        error = json.loads(capsys.readouterr().out)["error"]
        assert (error["code"], error["field"], error["precondition_violations"]) == ("FAILED_PRECONDITION", "sample_set_id", unusable)
        assert "(sample_index 1, 3)" in error["message"]


def test_the_async_client_s_operation_error_lists_the_unusable_samples_too(server):
    import asyncio

    async def evaluate() -> tuple[FailedPreconditionError, FailedPreconditionError | None]:
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            operation = await client.evaluate_sample_set("blackened-async")
            with pytest.raises(FailedPreconditionError) as raised:
                await client.result(operation, timeout=60)
            return raised.value, operation.error

    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        client.create_sample_set([BLACK, GOOD, GOOD, BLACK], [0, 0, 1, 1], sample_set_id="blackened-async")
    raised, stored = asyncio.run(evaluate())
    for error in (raised, stored):
        assert isinstance(error, FailedPreconditionError) and error.field == "sample_set_id"
        assert error.precondition_violations == [("UNUSABLE_FEATURES", "samples[0]", ""), ("UNUSABLE_FEATURES", "samples[3]", "")]


def _set_with_an_image_that_does_not_decode_now(client: Client, sample_set_id: str, shade: int, monkeypatch) -> str:
    """A set of four samples whose rows 1 and 3 are one 32² image, which a server that
    allows 24 px a side at most no longer decodes (as a stricter server or decoder since
    its upload would refuse it); the image's digest."""
    import hashlib

    from explaind import imaging

    wide = _png(shade, side=32)
    client.create_sample_set([GOOD, wide, GOOD, wide], [0, 0, 1, 1], sample_set_id=sample_set_id)
    monkeypatch.setattr(imaging, "MAX_IMAGE_SIDE", 24)
    return hashlib.sha256(wide).hexdigest()


def test_an_operation_failed_for_a_stored_image_that_does_not_decode_names_the_samples_holding_it(server, monkeypatch):
    # Its error named the image alone, as field "sample <digest12>": one image may be
    # several samples of a set, and nothing said which to replace.
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        digest = _set_with_an_image_that_does_not_decode_now(client, "undecodable", 41, monkeypatch)
        operation = client.evaluate_sample_set("undecodable").wait(60)  # WaitOperation
        for error in (operation.error, operation.refresh().error):  # and GetOperation, from job_error_details
            assert isinstance(error, FailedPreconditionError) and error.field == "sample_set_id"
            assert f"the image {digest[:12]} of 2 samples of sample set 'undecodable' (sample_index 1, 3) does not decode now: " in error.details
            assert "the largest side allowed is 24" in error.details
            assert error.precondition_violations == [("UNDECODABLE_IMAGE", "samples[1]", ""), ("UNDECODABLE_IMAGE", "samples[3]", "")]


def test_an_operation_failed_for_stored_images_that_do_not_decode_names_them_all_not_only_the_first(server, monkeypatch):
    # The job's error named the first image its read met, and the next run the next one.
    import hashlib

    from explaind import imaging

    first, second = _png(44, side=32), _png(45, side=30)
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        client.create_sample_set([GOOD, first, GOOD, second, first], [0, 0, 1, 1, 2], sample_set_id="undecodable-two")
        monkeypatch.setattr(imaging, "MAX_IMAGE_SIDE", 24)
        operation = client.evaluate_sample_set("undecodable-two").wait(60)
        for error in (operation.error, operation.refresh().error):  # WaitOperation, and GetOperation from job_error_details
            assert isinstance(error, FailedPreconditionError) and error.field == "sample_set_id"
            assert (f"2 images of 3 samples of sample set 'undecodable-two' do not decode now; use a set without them: "
                    f"[{hashlib.sha256(first).hexdigest()[:12]}, sample_index 1, 4: image is 32x32; the largest side allowed is 24], "
                    f"[{hashlib.sha256(second).hexdigest()[:12]}, sample_index 3: image is 30x30; ") in error.details
            assert error.precondition_violations == [("UNDECODABLE_IMAGE", f"samples[{row}]", "") for row in (1, 3, 4)]


def test_a_decoder_out_of_memory_is_resource_exhausted_with_a_retry_hint_not_the_images_fault(server, monkeypatch):
    # Its MemoryError read as the file's fault: INVALID_ARGUMENT "cannot decode image bytes",
    # which partial_failure answered as that image's error, and a stored image's "does not
    # decode now" (FAILED_PRECONDITION, replace it), though it decodes once memory is free.
    from explaind import imaging

    def out_of_memory(image, orientation):
        raise MemoryError()

    # retry=False: the SDK would send the Predict again after its retry delay until the deadline (below).
    with Client(f"127.0.0.1:{server.port}", timeout=30, retry=False) as client:
        client.create_sample_set([GOOD, GOOD], [0, 1], sample_set_id="decodes-later")
        with monkeypatch.context() as patched:
            patched.setattr(imaging, "_as_viewed", out_of_memory)
            errors = []
            for call in (lambda: client.predict([GOOD, GOOD], partial_failure=True), lambda: client.evaluate_sample_set("decodes-later").result(timeout=60)):
                with pytest.raises(ResourceExhaustedError) as raised:
                    call()
                errors.append(raised.value)
    assert all("ran out of memory decoding the image; retry later" in error.details and not error.precondition_violations for error in errors)
    assert errors[0].retry_delay == 1.0 and errors[1].retry_delay is None  # an operation's error carries none, as the docs say
    # The SDK retried no RESOURCE_EXHAUSTED: a Predict whose decoder ran out of memory once
    # failed, though the server did nothing with it and asked for it again in 1 s.
    as_viewed, refusals = imaging._as_viewed, []

    def out_of_memory_once(image, orientation):
        if not refusals:
            refusals.append(image)
            raise MemoryError()
        return as_viewed(image, orientation)

    monkeypatch.setattr(imaging, "_as_viewed", out_of_memory_once)
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        assert len(client.predict([GOOD, GOOD])) == 2 and len(refusals) == 1


def test_out_of_memory_preparing_images_for_the_model_is_resource_exhausted_as_the_decoders_not_internal(server, monkeypatch):
    # Past the decoder, memory running out resizing an image, converting it to float or
    # stacking a batch (numpy's MemoryError, PyTorch's CPU allocator's RuntimeError) was
    # INTERNAL, a bug to report, though the call passes once memory is free.
    import torch

    from explaind import imaging

    allocator = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                             "1073741824 bytes. Error code 12 (Cannot allocate memory)")
    wide = _png(90, 32)  # resized to the model's 16 px
    # retry=False: the SDK sends a Predict again after its retry delay until the deadline
    # (test_a_decoder_out_of_memory_is_resource_exhausted_with_a_retry_hint_not_the_images_fault).
    with Client(f"127.0.0.1:{server.port}", timeout=30, retry=False) as client:
        client.create_sample_set([wide, wide], [0, 1], sample_set_id="prepared-later")
        for owner, name, error in ((imaging.InputGeometry, "fit", allocator), (imaging, "uint8_hwc_to_float_chw", MemoryError()), (torch, "stack", allocator)):
            def out_of_memory(*args, error=error, **kwargs):
                raise error

            errors = []
            with monkeypatch.context() as patched:
                patched.setattr(owner, name, out_of_memory)
                for call in (lambda: client.predict([wide, wide]), lambda: client.predict([wide, wide], partial_failure=True),
                             lambda: client.evaluate_sample_set("prepared-later").result(timeout=60)):
                    with pytest.raises(ResourceExhaustedError) as raised:
                        call()
                    errors.append(raised.value)
            assert all("ran out of memory preparing the images for the model; retry later" in error.details for error in errors), (name, errors)
            assert [error.retry_delay for error in errors] == [1.0, 1.0, None]  # an operation's error carries none, as a decoder's
        assert len(client.predict([wide, wide])) == 2  # memory free again, the same call passes


def test_the_host_out_of_memory_running_the_model_is_resource_exhausted_not_a_bug(server, monkeypatch):
    # The model's run on a CPU (or joining requests into one batch) out of host memory was
    # INTERNAL under an incident id, a bug to report, though the call passes once memory is free.
    allocator = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                             "1073741824 bytes. Error code 12 (Cannot allocate memory)")
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        for error in (allocator, MemoryError()):
            def out_of_memory(images, error=error):
                raise error

            with monkeypatch.context() as patched:
                patched.setattr(server.engine._batcher, "_run", out_of_memory)
                with pytest.raises(ResourceExhaustedError, match="the server ran out of memory; retry with fewer images per request, or later"):
                    client.predict([GOOD])
        assert len(client.predict([GOOD])) == 1  # memory free again, the same call passes


def test_an_inline_ranking_refused_for_a_stored_image_that_does_not_decode_names_the_samples_holding_it(server, monkeypatch, capsys):
    import json

    from explaind.client.cli import main as cli_main

    target = ["--target", f"127.0.0.1:{server.port}"]
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        digest = _set_with_an_image_that_does_not_decode_now(client, "undecodable-inline", 42, monkeypatch)
        with pytest.raises(FailedPreconditionError) as raised:
            client.rank_mistake_neurons("undecodable-inline", 0)
    assert raised.value.field == "sample_set_id" and f"the image {digest[:12]} of 2 samples" in raised.value.details
    assert raised.value.precondition_violations == [("UNDECODABLE_IMAGE", "samples[1]", ""), ("UNDECODABLE_IMAGE", "samples[3]", "")]
    assert cli_main([*target, "rank", "undecodable-inline", "--class", "0", "--json"]) == 1
    err = capsys.readouterr().err
    assert err.count("(sample_index 1, 3)") == 1 and "error: FAILED_PRECONDITION: sample_set_id: " in err, err
    # The same set's evaluation, as `operations get --json` shows its error.
    assert cli_main([*target, "evaluate", "undecodable-inline", "--no-wait", "--json"]) == 0
    name = json.loads(capsys.readouterr().out)["name"]
    assert cli_main([*target, "operations", "wait", name, "--json"]) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    undecodable = [{"type": "UNDECODABLE_IMAGE", "subject": f"samples[{i}]", "description": ""} for i in (1, 3)]
    assert (error["code"], error["field"], error["precondition_violations"]) == ("FAILED_PRECONDITION", "sample_set_id", undecodable)


def test_an_evaluation_whose_features_are_cached_names_the_samples_of_a_mistake_it_cannot_draw(server, monkeypatch):
    # Features cached before the image stopped decoding classify the set without a
    # decode: its mistakes grid decoded the image next, and failed INVALID_ARGUMENT
    # naming field "sample <digest12>", not the samples holding it.
    from explaind import imaging

    wide = _png(43, side=32)
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        client.create_sample_set([GOOD, wide], [0, 0], sample_set_id="cached-wide")
        result = client.evaluate_sample_set("cached-wide").result(timeout=60, download=False)  # caches both images' features
        predicted = next(iter(m.predicted_class for m in result.mistakes if m.sample_index == 1), 0)
        mistaken = (predicted + 1) % 3  # a label the model does not give the wide image
        client.create_sample_set([GOOD, wide, GOOD, wide], [0, mistaken, 1, mistaken], sample_set_id="cached-wide-mistaken")
        monkeypatch.setattr(imaging, "MAX_IMAGE_SIDE", 24)
        error = client.evaluate_sample_set("cached-wide-mistaken").wait(60).error
    assert isinstance(error, FailedPreconditionError) and error.field == "sample_set_id", error
    assert "of 2 samples of sample set 'cached-wide-mistaken' (sample_index 1, 3) does not decode now: " in error.details
    assert error.precondition_violations == [("UNDECODABLE_IMAGE", "samples[1]", ""), ("UNDECODABLE_IMAGE", "samples[3]", "")]

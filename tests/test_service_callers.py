"""Named callers ([server].callers_file, .admins): each owns what it creates, others may
read it but not change it, admins may change anything; the file is reloaded on change."""

from __future__ import annotations

import html
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import empty_pb2

from conftest import json_log_lines, limit_details, trailing_status
from explaind.client import AlreadyExistsError, Client, ExplaindError, InvalidArgumentError, Operation, ResourceExhaustedError, UnauthenticatedError
from explaind.config import ConfigError, default_config
from explaind.service import ExplaindServer, audit, auth, convert

CALLERS = "# who may call\nmonitoring tokenMON\n\nanalyst tokenANA\nroot tokenROOT\n"
IMAGE = np.full((8, 8, 3), 200, np.uint8)
HEX_TOKEN = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # as `openssl rand -hex 32` prints one


def start(tmp_path: Path, classifier_dir: Path, **server: object) -> ExplaindServer:
    config = default_config().replace("classifier", path=str(classifier_dir)).replace(
        "server", port=0, data_dir=str(tmp_path / "data"), **server)
    explaind = ExplaindServer(config)
    explaind.start()
    explaind.load_models()
    return explaind


def client(server: ExplaindServer, token: str) -> Client:
    return Client(f"127.0.0.1:{server.port}", timeout=60, token=token)


def denied(call, *args, **kwargs) -> str:
    """The message of the PERMISSION_DENIED the call must raise."""
    with pytest.raises(ExplaindError) as refused:
        call(*args, **kwargs)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED, refused.value
    return refused.value.details


@pytest.fixture()
def callers_file(tmp_path: Path) -> Path:
    path = tmp_path / "callers"
    path.write_text(CALLERS)
    return path


def test_each_caller_owns_what_it_creates_and_only_it_or_an_admin_changes_it(tmp_path, classifier_dir, callers_file, caplog):
    server = start(tmp_path, classifier_dir, callers_file=str(callers_file), admins=("root",))
    try:
        with client(server, "tokenMON") as monitoring, client(server, "tokenANA") as analyst, client(server, "tokenROOT") as root:
            made = monitoring.create_sample_set([IMAGE] * 10, [i % 2 for i in range(10)], sample_set_id="train")
            assert made.owner == "monitoring"
            # Reads stay open.
            assert analyst.sample_set("train").owner == "monitoring" and [s.owner for s in analyst.sample_sets()] == ["monitoring"]
            for message in (denied(analyst.append_samples, "train", [IMAGE], [0]), denied(analyst.delete_sample_set, "train")):
                assert "sample set 'train' is owned by caller 'monitoring'" in message and "tokenMON" not in message
            # The log names who was refused, for the operator; never a token.
            refusals = [re.sub(r" from \S+ ", " from PEER ", r.getMessage()) for r in caplog.records if r.getMessage().startswith("refused ")]
            assert refusals == [f"refused explaind.v1.SampleSetService/{method} from PEER (caller analyst): PERMISSION_DENIED: sample_set_id: "
                                "sample set 'train' is owned by caller 'monitoring'; only it or an admin ([server].admins) may change it, not 'analyst'"
                                for method in ("AppendSamples", "DeleteSampleSet")]
            # Its id is taken: appending to the set or deleting it is for its owner or an admin to do, not for another caller.
            for caller, advice in ((analyst, "exists, owned by caller 'monitoring'; choose another id"),
                                   (monitoring, "exists; append to it or delete it first"), (root, "exists; append to it or delete it first")):
                with pytest.raises(AlreadyExistsError) as taken:
                    caller.create_sample_set([IMAGE], [0], sample_set_id="train")
                assert taken.value.details == f"sample_set_id: sample set 'train' already {advice}"
            edit = monitoring.edit_head("train", 1, [0], max_epochs=1)
            version = edit.result().version
            assert (edit.owner, version.owner) == ("monitoring", "monitoring")
            assert "operations/" in denied(analyst.delete_operation, edit.name)
            assert "'monitoring'" in denied(analyst.operation(edit.name).cancel)
            assert f"head version {version.version_id!r} is owned by caller 'monitoring'" in denied(analyst.delete_head_version, version.version_id)
            # Only the admin changes the served head, whoever stored the version.
            assert "only an admin" in denied(monitoring.promote_head_version, version.version_id)
            assert "only an admin" in denied(analyst.rollback_head_version)
            assert denied(analyst.edit_head, "train", 1, [0], max_epochs=1, promote=True) == (
                "promote: only an admin ([server].admins) may promote the edited head, not caller 'analyst'")  # what to drop to edit
            assert root.promote_head_version(version.version_id).version.active
            root.rollback_head_version()
            # The admin changes what others own.
            root.append_samples("train", [IMAGE], [0])
            root.delete_head_version(version.version_id)
            root.delete_operation(edit.name)
            evaluation = analyst.evaluate_sample_set("train")
            assert [op.owner for op in monitoring.operations()] == ["analyst"]
            evaluation.result(timeout=60)
            analyst.delete_operation(evaluation.name)  # its own
            root.delete_sample_set("train")
    finally:
        server.stop(0)


def test_a_callers_sets_hold_at_most_max_samples_per_caller_counted_against_each_sets_owner(tmp_path, classifier_dir, callers_file, capsys):
    from explaind.client.cli import main

    server = start(tmp_path, classifier_dir, callers_file=str(callers_file), admins=("root",), max_samples_per_caller=10)
    try:
        with client(server, "tokenMON") as monitoring, client(server, "tokenANA") as analyst, client(server, "tokenROOT") as root:
            assert monitoring.model_metadata().limits.max_samples_per_caller == 10
            assert main(["--target", f"127.0.0.1:{server.port}", "--token", "tokenMON", "info"]) == 0
            assert ", 10 samples in one caller's sets," in capsys.readouterr().out
            monitoring.create_sample_set([IMAGE] * 6, [0] * 6, sample_set_id="a")
            monitoring.append_samples("a", [IMAGE] * 2, [1] * 2)
            monitoring.create_sample_set([IMAGE] * 2, [0] * 2, sample_set_id="b")  # 10 in two sets: at the limit, not past it
            for call in (lambda: monitoring.append_samples("b", [IMAGE], [0]),
                         lambda: monitoring.create_sample_set([IMAGE], [0], sample_set_id="c"),
                         lambda: root.append_samples("a", [IMAGE], [0])):  # the set's owner is charged, whoever appends
                with pytest.raises(ResourceExhaustedError) as refused:
                    call()
                assert refused.value.details == (
                    "samples: caller 'monitoring' holds 10 samples in its sample sets, and 1 more would pass its limit of 10 "
                    "([server].max_samples_per_caller): delete sets it no longer needs")
                # The field and the limit in one ErrorInfo (AIP-193: one a status).
                assert (refused.value.field, refused.value.reason, refused.value.quota_violations) == (
                    "samples", "SAMPLES_PER_CALLER_EXCEEDED", [("caller:monitoring", "samples in this caller's sets")])
            assert [s.sample_count for s in monitoring.sample_sets()] == [8, 2]  # nothing of a refused call is kept
            # A limit's refusal asks for no retry (no RetryInfo): the SDK sent each call once, not until its deadline.
            refused = {method: server.metrics.registry.get_sample_value("explaind_rpc_duration_seconds_count", {
                "service": "explaind.v1.SampleSetService", "method": method, "code": "RESOURCE_EXHAUSTED"}) for method in ("AppendSamples", "CreateSampleSet")}
            assert refused == {"AppendSamples": 2, "CreateSampleSet": 1}
            # Another caller has a limit of its own, and an admin's own sets count against it.
            analyst.create_sample_set([IMAGE] * 10, [0] * 10, sample_set_id="other")
            root.create_sample_set([IMAGE] * 10, [0] * 10, sample_set_id="admins")
            monitoring.delete_sample_set("b")  # room again
            monitoring.append_samples("a", [IMAGE] * 2, [0] * 2)
            assert monitoring.sample_set("a").sample_count == 10
    finally:
        server.stop(0)


def test_an_upload_under_a_request_id_refused_part_way_at_max_samples_per_caller_deletes_its_part(tmp_path, classifier_dir, callers_file):
    # Every run of the upload is refused at the same request: the part kept uploading held
    # the caller's samples until [server].upload_idle_timeout_s, refusing its other uploads.
    server = start(tmp_path, classifier_dir, callers_file=str(callers_file), max_samples_per_caller=10)
    try:
        with client(server, "tokenMON") as monitoring:
            with pytest.raises(ResourceExhaustedError) as refused:
                monitoring.create_sample_set([IMAGE] * 12, [0] * 12, sample_set_id="big", chunk_size=4,
                                             request_id="6f1c3a52-8d4e-4b7a-9c1d-2e5f7a9b0c3d")
            assert refused.value.field == "samples"
            assert "the partly uploaded sample set 'big' was deleted" in refused.value.__notes__
            assert monitoring.sample_sets() == []
            monitoring.create_sample_set([IMAGE] * 10, [0] * 10, sample_set_id="fits")  # its room is free again
    finally:
        server.stop(0)


def test_the_store_checks_a_callers_samples_in_the_transaction_that_adds_them(tmp_path):
    # The servicer asks before decoding images; a create or append racing another of the
    # same caller past that check is still refused as it writes.
    from explaind.errors import ResourceExhausted
    from explaind.store import SampleRecord, SQLiteStore

    store = SQLiteStore(tmp_path, max_samples_per_owner=3)
    samples = [SampleRecord(digest="0" * 64, label=0, attributes={})] * 2
    store.create_sample_set("a", "", samples, owner="monitoring")
    store.create_sample_set("unowned", "", samples * 4)  # a set without a named caller counts against none
    with pytest.raises(ResourceExhausted, match=r"^samples: caller 'monitoring' holds 2 samples .* 2 more would pass its limit of 3 "):
        store.create_sample_set("b", "", samples, owner="monitoring")
    with pytest.raises(ResourceExhausted, match=r"^samples: caller 'monitoring' holds 2 samples .* 2 more would pass its limit of 3 "):
        store.append_samples("a", samples)
    store.append_samples("a", samples[:1])
    assert [info.sample_count for info in store.list_sample_sets()] == [3, 8]
    store.close()


HEAD_VERSIONS_REFUSED = ("caller 'monitoring' holds {held} head version{s}, and 1 more would pass its limit of {held} "
                         "([server].max_head_versions_per_caller): delete versions it no longer needs (explaind head-versions delete)")
HEAD_VERSIONS_LIMIT = ("HEAD_VERSIONS_PER_CALLER_EXCEEDED", [("caller:monitoring", "head versions this caller holds")])


def test_a_callers_edits_hold_at_most_max_head_versions_per_caller_until_it_deletes_one(tmp_path, classifier_dir, callers_file, capsys):
    # Each version is the head's weights whole (8 MB for ResNet-50): unbounded, one
    # caller's edits could fill the data dir for all.
    from explaind.client.cli import main

    server = start(tmp_path, classifier_dir, callers_file=str(callers_file), admins=("root",), max_head_versions_per_caller=2)
    try:
        with client(server, "tokenMON") as monitoring, client(server, "tokenANA") as analyst, client(server, "tokenROOT") as root:
            assert monitoring.model_metadata().limits.max_head_versions_per_caller == 2
            assert main(["--target", f"127.0.0.1:{server.port}", "--token", "tokenMON", "info"]) == 0
            assert ", 2 head versions of one caller's edits," in capsys.readouterr().out
            monitoring.create_sample_set([IMAGE] * 10, [i % 2 for i in range(10)], sample_set_id="train")
            first, _ = (monitoring.edit_head("train", 1, [0], max_epochs=1).result(timeout=60).version for _ in range(2))
            with pytest.raises(ResourceExhaustedError) as refused:
                monitoring.edit_head("train", 1, [0], max_epochs=1)
            assert refused.value.details == HEAD_VERSIONS_REFUSED.format(held=2, s="s")
            assert (refused.value.reason, refused.value.quota_violations) == HEAD_VERSIONS_LIMIT
            with pytest.raises(InvalidArgumentError) as wrong:  # a wrong option at the limit is named, not hidden behind the limit
                monitoring.edit_head("train", 1, [10_000], max_epochs=1)
            assert wrong.value.field == "neurons[0]"
            assert len(monitoring.operations()) == 2  # refused at submit: no job
            # Another caller has a limit of its own; the loaded v0 counts against none.
            analyst.edit_head("train", 1, [0], max_epochs=1).result(timeout=60)
            root.edit_head("train", 1, [0], max_epochs=1).result(timeout=60)
            monitoring.delete_head_version(first.version_id)  # room again
            assert monitoring.edit_head("train", 1, [0], max_epochs=1).result(timeout=60).version.owner == "monitoring"
    finally:
        server.stop(0)


def test_the_cli_s_json_error_at_the_head_version_limit_names_the_limit(tmp_path, classifier_dir, callers_file, capsys):
    # `explaind edit-head ... --json` gave code and message alone: a script had to parse the
    # message to tell the caller's head-version limit from a full job queue.
    from explaind.client.cli import main

    server = start(tmp_path, classifier_dir, callers_file=str(callers_file), max_head_versions_per_caller=1)
    try:
        with client(server, "tokenMON") as monitoring:
            monitoring.create_sample_set([IMAGE] * 10, [i % 2 for i in range(10)], sample_set_id="train")
            monitoring.edit_head("train", 1, [0], max_epochs=1).result(timeout=60)
            class_name = monitoring.model_metadata().class_names[1]
        assert main(["--target", f"127.0.0.1:{server.port}", "--token", "tokenMON", "edit-head", "train", "--class", class_name,
                     "--neurons", "0", "--max-epochs", "1", "--json"]) == 1
        error = json.loads(capsys.readouterr().out)["error"]
        assert (error["code"], error["message"]) == ("RESOURCE_EXHAUSTED", HEAD_VERSIONS_REFUSED.format(held=1, s=""))
        reason, violations = HEAD_VERSIONS_LIMIT
        assert error["reason"] == reason
        assert error["quota_violations"] == [{"subject": subject, "description": description} for subject, description in violations]
    finally:
        server.stop(0)


def test_the_served_head_version_does_not_count_against_the_caller_whose_edit_stored_it(tmp_path):
    # Its caller cannot delete a served version: counted, a caller whose one version an admin promoted at a
    # limit of 1 could never edit again, whatever the refusal's advice to delete versions.
    from explaind.errors import ResourceExhausted
    from explaind.store import HeadVersionRecord, SQLiteStore

    store = SQLiteStore(tmp_path, max_head_versions_per_owner=1)
    with store.writing_blobs() as put:
        weights = put(b"head weights")
    store.insert_head_version(HeadVersionRecord("f", "v1", "h", weights, "", 0.0, owner="monitoring"))
    with pytest.raises(ResourceExhausted):
        store.require_room_for_head_version("f", "monitoring")
    store.set_active_head_version("f", "v1")
    store.require_room_for_head_version("f", "monitoring")
    store.insert_head_version(HeadVersionRecord("f", "v2", "h", weights, "v1", 1.0, owner="monitoring"))
    with pytest.raises(ResourceExhausted, match="^caller 'monitoring' holds 1 head version, "):
        store.insert_head_version(HeadVersionRecord("f", "v3", "h", weights, "v1", 2.0, owner="monitoring"))
    store.close()


def test_edits_racing_past_the_check_at_submit_store_one_version_and_the_other_fails_resource_exhausted(tmp_path, classifier_dir, callers_file,
                                                                                                       capsys):
    # Both submitted while the caller held none, each passes the check at submit; the
    # store asks again as it inserts, so the later one stores nothing.
    from explaind.client.cli import main

    server = start(tmp_path, classifier_dir, callers_file=str(callers_file), max_head_versions_per_caller=1)
    try:
        with client(server, "tokenMON") as monitoring:
            monitoring.create_sample_set([IMAGE] * 10, [i % 2 for i in range(10)], sample_set_id="train")
            gate = threading.Event()
            server.engine.jobs.submit("block", lambda context: (gate.wait(30), empty_pb2.Empty())[1])  # the edits wait queued
            first, second = (monitoring.edit_head("train", 1, [0], max_epochs=1) for _ in range(2))
            gate.set()
            stored = first.result(timeout=60).version
            with pytest.raises(ResourceExhaustedError) as refused:
                second.result(timeout=60)
            assert refused.value.details == HEAD_VERSIONS_REFUSED.format(held=1, s="")
            # The operation's error carries the details the call's refusal would.
            assert (refused.value.reason, refused.value.quota_violations) == HEAD_VERSIONS_LIMIT
            assert limit_details(refused.value.operation._message.error) == (
                "HEAD_VERSIONS_PER_CALLER_EXCEEDED", {"setting": "[server].max_head_versions_per_caller", "limit": "1"}, HEAD_VERSIONS_LIMIT[1])
            assert [v.version_id for v in monitoring.head_versions()] == ["v0", stored.version_id]
        # The CLI's JSON of the failed job names its limit as the SDK's error does.
        assert main(["--target", f"127.0.0.1:{server.port}", "--token", "tokenMON", "operations", "get", second.name, "--json"]) == 0
        error = json.loads(capsys.readouterr().out)["error"]
        assert (error["reason"], [(v["subject"], v["description"]) for v in error["quota_violations"]]) == HEAD_VERSIONS_LIMIT
    finally:
        server.stop(0)


def test_a_promoting_edit_refused_at_the_limit_serves_nothing_stores_nothing_and_leaves_its_weights_to_the_sweep(
        tmp_path, classifier_dir, callers_file):
    # The store's refusal comes before the promote: a refused edit must not be served, nor
    # leave its 8 MB weights file behind once no version names it.
    server = start(tmp_path, classifier_dir, callers_file=str(callers_file), max_head_versions_per_caller=1)
    try:
        with client(server, "tokenMON") as monitoring:
            monitoring.create_sample_set([IMAGE] * 10, [i % 2 for i in range(10)], sample_set_id="train")
            gate = threading.Event()
            server.engine.jobs.submit("block", lambda context: (gate.wait(30), empty_pb2.Empty())[1])  # the edits wait queued
            # The first stores a version it does not serve, which counts (a served one would not); the second would serve its own.
            first, second = (monitoring.edit_head("train", 1, [neuron], max_epochs=1, promote=neuron == 1) for neuron in (0, 1))
            gate.set()
            stored = first.result(timeout=60).version
            with pytest.raises(ResourceExhaustedError) as refused:
                second.result(timeout=60)
            assert refused.value.details == HEAD_VERSIONS_REFUSED.format(held=1, s="")
            # A job's RESOURCE_EXHAUSTED counts where ExplaindJobsFailing looks (deploy/alerts.yml says so).
            assert server.metrics.registry.get_sample_value(
                "explaind_jobs_ended_total", {"kind": "edit_head", "outcome": "failed", "code": "RESOURCE_EXHAUSTED"}) == 1
            assert [(v.version_id, v.active) for v in monitoring.head_versions()] == [("v0", True), (stored.version_id, False)]
            assert server.store.delete_unused_blobs() == 1  # the refused edit's weights, which only it had
            (digest,) = server.store._db.execute("SELECT weights_digest FROM head_versions WHERE version_id = ?", (stored.version_id,)).fetchone()
            assert server.store.get_blob(digest)  # the stored one's stay
            with pytest.raises(ResourceExhaustedError) as refused:  # at submit, before any training or promote
                monitoring.edit_head("train", 1, [0], max_epochs=1, promote=True)
            assert refused.value.details == HEAD_VERSIONS_REFUSED.format(held=1, s="")
    finally:
        server.stop(0)


def test_a_report_of_a_caller_at_its_head_version_limit_is_written_without_the_edit_saying_why(tmp_path, classifier_dir, callers_file,
                                                                                               world_images, capsys):
    # A nightly --discard-edit job at its limit failed every night after its ranking and
    # visualisations ran, writing no page: the page now goes on without the edit.
    from explaind.client.cli import main

    server = start(tmp_path, classifier_dir, callers_file=str(callers_file), max_head_versions_per_caller=1)
    try:
        images, labels = world_images
        mislabelled = (labels[:24] + 1) % 6  # every sample a mistake, for a ranking
        with client(server, "tokenMON") as monitoring:
            monitoring.create_sample_set(images[:24], mislabelled, sample_set_id="nightly")
            class_name = monitoring.model_metadata().class_names[int(mislabelled[0])]
            held = monitoring.edit_head("nightly", 1, [0], max_epochs=1).result(timeout=60).version.version_id
        target = ["--target", f"127.0.0.1:{server.port}", "--token", "tokenMON"]
        page = tmp_path / "report.html"
        assert main([*target, "report", "--class", class_name, "--sample-set", "nightly", "--out", str(page), "--steps", "2",
                     "--stability", "0", "--discard-edit", "--json"]) == 0
        refused = HEAD_VERSIONS_REFUSED.format(held=1, s="")
        out, err = capsys.readouterr()
        assert f"warning: no head edit evaluated: {refused}\n" in err
        written = json.loads(out)
        assert (written["head_version"], written["head_version_kept"], written["edit_command"]) == (None, None, None)
        assert written["no_edit_reason"] == refused and written["visualized_neurons"] == written["ranked_neurons"] > 0
        written_page = page.read_text(encoding="utf-8")
        assert f"as this caller holds as many head versions as it may ({html.escape(refused)})" in written_page
        assert "<code>explaind head-versions delete VERSION</code>" in written_page
        shown = re.findall(r"<img class='visualization' data-neuron='(\d+)'", written_page)
        assert len(set(shown)) == len(shown) == written["ranked_neurons"]
        with client(server, "tokenMON") as monitoring:
            assert [v.version_id for v in monitoring.head_versions()] == ["v0", held]  # nothing stored, nothing deleted
    finally:
        server.stop(0)


def test_edits_without_a_named_caller_count_against_no_caller_s_head_versions(tmp_path, classifier_dir):
    server = start(tmp_path, classifier_dir, max_head_versions_per_caller=1)
    try:
        with client(server, "") as anyone:
            anyone.create_sample_set([IMAGE] * 10, [i % 2 for i in range(10)], sample_set_id="train")
            for _ in range(2):
                anyone.edit_head("train", 1, [0], max_epochs=1).result(timeout=60)
            assert len(anyone.head_versions()) == 3
    finally:
        server.stop(0)


def test_a_head_the_server_loaded_from_a_model_file_is_deleted_by_an_admin_only(tmp_path, classifier_dir, callers_file):
    # Stored at a start, not by a caller: without an owner it was open to every caller,
    # which could delete the earlier model file's head the admins would serve again.
    from explaind.store import HeadVersionRecord

    server = start(tmp_path, classifier_dir, callers_file=str(callers_file), admins=("root",))
    try:
        store, feature_version = server.engine.store, server.engine.models.active.feature_version
        weights = store.get_head_version(feature_version, "v0").weights_digest
        store.insert_head_version(HeadVersionRecord(feature_version, "v7", "earlier", weights, "", 0.0, details={"method": "loaded"}))
        with client(server, "tokenANA") as analyst, client(server, "tokenROOT") as root:
            assert analyst.head_version("v7").owner == ""
            # Naming the field, as the refusal of another caller's version does.
            assert denied(analyst.delete_head_version, "v7") == (
                "version_id: only an admin ([server].admins) may delete head version 'v7', a head loaded from a model file, not caller 'analyst'")
            root.delete_head_version("v7")
    finally:
        server.stop(0)


def test_a_request_id_is_its_callers_own_and_another_caller_sending_it_again_gets_nothing_of_the_first(tmp_path, classifier_dir, callers_file):
    # A repeat is answered with what the first request made: from another caller, with the
    # same request, it would get the first caller's set or operation as its own (and an
    # audit line naming it as their maker). Its refusal named them too: the operation in a
    # google.rpc.ResourceInfo, which the SDK read as error.operation, the caller's own.
    server = start(tmp_path, classifier_dir, callers_file=str(callers_file), admins=("root",))
    upload, evaluation, appended = ("123e4567-e89b-42d3-a456-426614174000", "00000000-0000-4000-8000-000000000001",
                                    "00000000-0000-4000-8000-000000000002")
    try:
        with client(server, "tokenMON") as monitoring, client(server, "tokenANA") as analyst, client(server, "tokenROOT") as root:
            made = monitoring.create_sample_set([IMAGE] * 2, [0, 1], sample_set_id="train", request_id=upload)
            operation = monitoring.evaluate_sample_set("train", request_id=evaluation)
            for other in (analyst, root):
                for call in (lambda: other.create_sample_set([IMAGE] * 2, [0, 1], sample_set_id="train", request_id=upload),
                             lambda: other.evaluate_sample_set("train", request_id=evaluation)):
                    with pytest.raises(ExplaindError) as refused:
                        call()
                    assert (refused.value.code, refused.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "request_id"), refused.value
                    assert "was sent with another request by another caller; give each request its own" in refused.value.details
                    assert refused.value.operation is None and operation.name not in refused.value.details
            # The caller's own repeats still get what the first made, and its own other request under the id names it.
            assert monitoring.create_sample_set([IMAGE] * 2, [0, 1], sample_set_id="train", request_id=upload).uid == made.uid
            assert monitoring.evaluate_sample_set("train", request_id=evaluation).name == operation.name
            with pytest.raises(ExplaindError, match=f"which created {operation.name}") as refused:
                monitoring.evaluate_sample_set("train", batch_size=8, request_id=evaluation)
            assert refused.value.operation is not None and refused.value.operation.name == operation.name
            assert [op.owner for op in root.operations()] == ["monitoring"]
            # An admin's append to the caller's set is the admin's request: its refusal names the set to the admin.
            root.append_samples("train", [IMAGE], [0], request_id=appended)
            with pytest.raises(ExplaindError, match="which was applied to sample set 'train'"):
                root.append_samples("train", [IMAGE] * 2, [0, 1], request_id=appended)
    finally:
        server.stop(0)


def _audited(lines: list[dict]) -> list[dict]:
    """The audit lines' fields: all of a line's but its time, level, logger and message."""
    return [{key: value for key, value in line.items() if key not in ("time", "level", "logger", "message")} for line in lines]


def test_each_change_is_logged_with_its_caller_action_and_ids_and_reads_and_refusals_are_not(tmp_path, classifier_dir, callers_file):
    server = start(tmp_path, classifier_dir, callers_file=str(callers_file), admins=("root",))
    try:
        with (client(server, "tokenMON") as monitoring, client(server, "tokenANA") as analyst, client(server, "tokenROOT") as root,
              client(server, "tokenWRONG") as stranger, json_log_lines(audit.__name__) as lines):
            made = monitoring.create_sample_set([IMAGE] * 10, [i % 2 for i in range(10)], sample_set_id="train")
            appended = monitoring.append_samples("train", [IMAGE], [0])
            # Reads, Predict and refused calls change nothing.
            analyst.sample_set("train"), analyst.sample_sets(), analyst.predict([IMAGE])
            denied(analyst.delete_sample_set, "train")
            with pytest.raises(UnauthenticatedError):
                stranger.delete_sample_set("train")
            edit = monitoring.edit_head("train", 1, [0], max_epochs=1)
            version = edit.result().version
            promoted = root.promote_head_version(version.version_id)
            root.promote_head_version(version.version_id)  # served already: no change
            rolled_back = root.rollback_head_version()
            root.delete_head_version(version.version_id)
            # One job at a time: the evaluation waits behind the visualisation, so its cancel finds it queued.
            visualization = analyst.visualize_neurons([0], method="feature_visualization", steps=10_000)
            evaluation = analyst.evaluate_sample_set("train")
            evaluation.cancel().wait(timeout=60)  # WaitOperation: a read
            evaluation.cancel()  # ended: no change
            visualization.cancel()
            visualization.cancel()  # asked to stop already: no change
            visualization.wait(timeout=60)
            edit.cancel()  # succeeded: no change
            analyst.delete_operation(evaluation.name)
            root.delete_sample_set("train")
        edit_id, evaluation_id, visualization_id = (operation.name.removeprefix("operations/") for operation in (edit, evaluation, visualization))
        assert _audited(lines) == [
            {"action": "create_sample_set", "caller": "monitoring", "sample_set_id": "train", "sample_set_uid": made.uid},
            {"action": "append_samples", "caller": "monitoring", "sample_set_id": "train", "sample_set_uid": appended.uid},
            {"action": "submit_operation", "caller": "monitoring", "operation_id": edit_id, "kind": "edit_head"},
            {"action": "promote_head_version", "caller": "root", "version_id": version.version_id,
             "previous_version_id": promoted.previous_version_id},
            {"action": "rollback_head_version", "caller": "root", "version_id": rolled_back.version.version_id,
             "previous_version_id": version.version_id},
            {"action": "delete_head_version", "caller": "root", "version_id": version.version_id},
            {"action": "submit_operation", "caller": "analyst", "operation_id": visualization_id, "kind": "visualize_neurons"},
            {"action": "submit_operation", "caller": "analyst", "operation_id": evaluation_id, "kind": "evaluate_sample_set"},
            {"action": "cancel_operation", "caller": "analyst", "operation_id": evaluation_id},
            {"action": "cancel_operation", "caller": "analyst", "operation_id": visualization_id},
            {"action": "delete_operation", "caller": "analyst", "operation_id": evaluation_id},
            {"action": "delete_sample_set", "caller": "root", "sample_set_id": "train"},
        ]
        assert lines[-1]["message"] == "delete_sample_set sample_set_id=train by caller root" and lines[-1]["level"] == "INFO"
        assert not any("token" in line["message"] for line in lines)
    finally:
        server.stop(0)


def test_without_named_callers_changes_are_logged_without_a_caller(tmp_path, classifier_dir):
    server = start(tmp_path, classifier_dir, token="tokenONE")
    try:
        with client(server, "tokenONE") as anyone, json_log_lines(audit.__name__) as lines:
            made = anyone.create_sample_set([IMAGE] * 2, [0, 1], sample_set_id="shared")
            anyone.delete_sample_set("shared")
        assert _audited(lines) == [{"action": "create_sample_set", "sample_set_id": "shared", "sample_set_uid": made.uid},
                                   {"action": "delete_sample_set", "sample_set_id": "shared"}]
        assert [line["message"] for line in lines] == [f"create_sample_set sample_set_id=shared sample_set_uid={made.uid}",
                                                       "delete_sample_set sample_set_id=shared"]
    finally:
        server.stop(0)


def test_every_method_that_is_not_audited_is_a_read():
    """A new mutating RPC must join audit.ACTIONS (or this list, if it changes nothing)."""
    from google.protobuf import descriptor_pool

    from explaind.v1 import inference_pb2, neuroinspect_pb2, operations_pb2, sample_sets_pb2

    methods = {(service.full_name, method.name) for module in (inference_pb2, neuroinspect_pb2, operations_pb2, sample_sets_pb2)
               for service in module.DESCRIPTOR.services_by_name.values() for method in service.methods}
    pool = descriptor_pool.Default()
    assert all(pool.FindServiceByName(service).FindMethodByName(method) for service, method in audit.ACTIONS)
    reads = {name for _, name in methods - audit.ACTIONS.keys()}
    assert reads == {"Predict", "GetModelMetadata", "ListHeadVersions", "GetHeadVersion", "GetSampleSet", "ListSampleSets", "ListSamples",
                     "GetOperation", "ListOperations", "WaitOperation", "WatchOperation", "GetArtifact"}


def test_a_ranking_answered_inline_is_no_change_and_an_edit_that_promotes_says_so():
    """Only a ranking that became an operation is audited (one answered inline is a read);
    an edit submitted with promote=True says it will change the served head."""
    from google.longrunning import operations_pb2 as lro_pb2

    from explaind.v1 import neuroinspect_pb2, operations_pb2

    operation = lro_pb2.Operation(name="operations/00112233445566ff")
    operation.metadata.Pack(operations_pb2.OperationMetadata(kind="edit_head"))
    service = "explaind.v1.NeuroInspectService"
    with json_log_lines(audit.__name__) as lines:
        audit.log_change(service, "RankMistakeNeurons", neuroinspect_pb2.RankMistakeNeuronsRequest(sample_set_id="train"),
                         neuroinspect_pb2.RankMistakeNeuronsResponse(ranking=neuroinspect_pb2.NeuronRanking()), "analyst")
        audit.log_change(service, "EditHead", neuroinspect_pb2.EditHeadRequest(sample_set_id="train", promote=True),
                         neuroinspect_pb2.EditHeadResponse(operation=operation), "analyst")
    assert _audited(lines) == [{"action": "submit_operation", "caller": "analyst", "operation_id": "00112233445566ff", "kind": "edit_head",
                                "promote": "true"}]
    assert lines[0]["message"] == "submit_operation operation_id=00112233445566ff kind=edit_head promote=true by caller analyst"


def _serving_with_a_held_model(config) -> tuple[ExplaindServer, threading.Event, threading.Event]:
    """A started server whose model, once a forward begins (``entered``), stays busy until
    ``gate`` is set; the caller stops the server."""
    server = ExplaindServer(config)
    server.start()
    server.load_models()
    batcher = server.engine._batcher
    forward, gate, entered = batcher._run, threading.Event(), threading.Event()

    def held_forward(images):
        entered.set()
        gate.wait(30)
        return forward(images)

    batcher._run = held_forward
    return server, gate, entered


def test_a_callers_predictions_waiting_are_kept_to_its_share_and_another_callers_still_queue(tmp_path, classifier_dir, callers_file, caplog,
                                                                                             monkeypatch):
    config = default_config().replace("classifier", path=str(classifier_dir)).replace(
        "server", port=0, data_dir=str(tmp_path / "data"), callers_file=str(callers_file)).replace("batching", max_queued_images_per_caller=2)
    server, gate, entered = _serving_with_a_held_model(config)  # what follows the first Predict queues
    batcher = server.engine._batcher
    try:
        with client(server, "tokenMON") as monitoring, client(server, "tokenANA") as analyst, ThreadPoolExecutor(3) as pool:
            assert monitoring.model_metadata().max_queued_images_per_caller == 2  # a caller can see its share
            busy = pool.submit(monitoring.predict, [IMAGE])
            assert entered.wait(30)
            waiting = pool.submit(monitoring.predict, [IMAGE] * 2)
            while batcher.queue_depth < 2:  # bounded by the future's own timeout below if it never queues
                assert not waiting.done(), waiting.exception()
                time.sleep(0.01)
            decoded, decode = [], convert.decode_image
            monkeypatch.setattr(convert, "decode_image", lambda *args, **kwargs: decoded.append(kwargs["field"]) or decode(*args, **kwargs))
            with pytest.raises(ExplaindError) as refused:
                monitoring.predict([IMAGE])
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert decoded == []  # refused before its images were decoded, which it would have paid for in full
            assert refused.value.details.startswith("prediction queue is full for caller 'monitoring' (2 of its images waiting, limit 2")
            assert (refused.value.reason, refused.value.quota_violations) == (
                "QUEUED_IMAGES_PER_CALLER_EXCEEDED", [("caller:monitoring", "images this caller has waiting")])
            # The log says whose backlog it is: the alert's description sends operators there.
            assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused explaind.v1.InferenceService/Predict from ")
                    and "(caller monitoring): RESOURCE_EXHAUSTED: prediction queue is full for caller 'monitoring'" in r.getMessage()]
            theirs = pool.submit(analyst.predict, [IMAGE] * 2)
            while batcher.queue_depth < 4:
                assert not theirs.done(), theirs.exception()
                time.sleep(0.01)
            gate.set()
            assert [len(f.result(60)) for f in (busy, waiting, theirs)] == [1, 2, 2]
    finally:
        gate.set()
        server.stop(0)


def test_calls_past_max_concurrent_rpcs_are_refused_before_they_wait_for_a_thread(tmp_path, classifier_dir):
    # Calls waiting for one of the busy threads piled up without a bound, each holding its
    # request (up to max_message_bytes) in memory.
    assert default_config().replace("server", max_workers=8).server.concurrent_rpcs == 32  # 0, the default: 4 per worker thread
    config = default_config().replace("classifier", path=str(classifier_dir)).replace(
        "server", port=0, data_dir=str(tmp_path / "data"), max_workers=2, max_concurrent_rpcs=2)
    server, gate, entered = _serving_with_a_held_model(config)  # each Predict holds its call
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=30, retry=False) as caller, ThreadPoolExecutor(2) as pool:
            held = [pool.submit(caller.predict, [IMAGE])]
            assert entered.wait(30)
            held.append(pool.submit(caller.predict, [IMAGE]))  # queued behind the busy model, in the second thread
            started = server.metrics.rpcs_started.labels(service="explaind.v1.InferenceService", method="Predict")
            while started._value.get() < 2:  # both calls are in their threads
                assert not held[1].done(), held[1].exception()
                time.sleep(0.01)
            with pytest.raises(ResourceExhaustedError, match="Concurrent RPC limit exceeded"):  # it would have waited for a thread
                caller.predict([IMAGE])
            # Counted on arrival, timed by no handler: started minus timed minus in flight is
            # where an operator sees these (docs/configuration.md, deploy/alerts.yml).
            assert started._value.get() == 3
            assert server.metrics.registry.get_sample_value("explaind_rpc_duration_seconds_count", {
                "service": "explaind.v1.InferenceService", "method": "Predict", "code": "RESOURCE_EXHAUSTED"}) is None
            gate.set()
            assert [len(future.result(60)) for future in held] == [1, 1]
    finally:
        gate.set()
        server.stop(0)


def test_a_rotated_callers_file_takes_effect_without_a_restart(tmp_path, classifier_dir, callers_file, monkeypatch, caplog):
    monkeypatch.setattr(auth, "RECHECK_INTERVAL_S", 0.0)
    server = start(tmp_path, classifier_dir, callers_file=str(callers_file))
    try:
        with client(server, "tokenANA") as analyst, client(server, "tokenNEW") as newcomer:
            assert analyst.sample_sets() == []
            with pytest.raises(UnauthenticatedError):
                newcomer.sample_sets()
            callers_file.write_text("monitoring tokenMON\nnewcomer tokenNEW\n")
            assert newcomer.create_sample_set([IMAGE], [0], sample_set_id="new").owner == "newcomer"
            with pytest.raises(UnauthenticatedError):
                analyst.sample_sets()
            callers_file.write_text("monitoring tokenMON\nmonitoring tokenNEW\n")  # half-done: keeps what was in force
            assert newcomer.sample_set("new").owner == "newcomer"
            callers_file.write_text("")  # emptied before it is written again: so does this
            assert newcomer.sample_set("new").owner == "newcomer"
            assert "names no caller" in caplog.text
            assert "line 2: caller 'monitoring' is named on line 1 too" in caplog.text and "tokenNEW" not in caplog.text
    finally:
        server.stop(0)


def _stepping_job(server: ExplaindServer) -> tuple[str, queue.Queue]:
    """An operation's name and the queue that steps it: each number put there is its next
    progress step, None ends it (as it ends the test's watches)."""
    steps: queue.Queue = queue.Queue()

    def stepping(ctx) -> empty_pb2.Empty:
        for step in iter(lambda: steps.get(timeout=30), None):
            ctx.report_progress(step)
        return empty_pb2.Empty()

    steps.put(1)
    return convert.OPERATION_PREFIX + server.engine.jobs.submit("stepping", stepping).record.job_id, steps


def _watching_at(caller: Client, name: str, step: int) -> Iterator[Operation]:
    """A watch of ``name`` that has read up to the operation's progress ``step``."""
    updates = caller.operation(name).watch(timeout=60)
    while next(updates).progress.step != step:
        pass
    return updates


def test_a_stream_s_context_turns_inactive_once_its_caller_is_revoked():
    # A servicer waiting for something to send (WatchOperation) looks only at
    # context.is_active(): it stops there, before it has a message to send.
    from types import SimpleNamespace

    from explaind.service.interceptors import _RevocableContext

    revocation = [""]
    context = _RevocableContext(SimpleNamespace(is_active=lambda: True, peer=lambda: "ipv4:127.0.0.1:1"), lambda: revocation[0])
    assert context.is_active() and context.peer() == "ipv4:127.0.0.1:1"
    revocation[0] = "caller 'analyst' was removed from the callers file"
    assert not context.is_active()


def test_a_stream_s_servicer_is_given_the_context_its_callers_revocation_turns_inactive():
    # The interceptor must hand the servicer that context, not grpc's own: a watch with
    # nothing new to send would otherwise wait on for its revoked caller until the job ends.
    from types import SimpleNamespace

    from explaind.metrics import Metrics
    from explaind.service.interceptors import _Observed
    from explaind.v1 import common_pb2

    aborted = []

    def abort(code, details):
        aborted.append((code, details))
        raise RuntimeError("aborted")

    context = SimpleNamespace(is_active=lambda: True, peer=lambda: "ipv4:127.0.0.1:1", abort=abort,
                              code=lambda: aborted[-1][0] if aborted else None)  # as grpc's: the code it aborted with
    revocation, looks = [""], []

    def watch(request, context):
        yield common_pb2.Image()
        revocation[0] = "caller 'analyst' was removed from the callers file"
        looks.append(context.is_active())  # a servicer waiting for something to send looks here, and stops

    with pytest.raises(RuntimeError, match="aborted"), _Observed(Metrics(), "explaind.v1.OperationsService", "WatchOperation", context, 1000) as observed:
        assert len(list(observed.call_stream(watch, None, context, lambda: revocation[0]))) == 1
    assert looks == [False] and aborted == [(grpc.StatusCode.UNAUTHENTICATED, revocation[0])]


def test_a_reload_that_removes_a_caller_ends_its_open_streams_and_no_other_callers(tmp_path, classifier_dir, callers_file, monkeypatch):
    # A removed caller's WatchOperation went on sending it every update until the job ended.
    monkeypatch.setattr(auth, "RECHECK_INTERVAL_S", 0.0)
    server = start(tmp_path, classifier_dir, callers_file=str(callers_file))
    name, steps = _stepping_job(server)
    try:
        with client(server, "tokenANA") as analyst, client(server, "tokenMON") as monitoring:
            removed, kept = _watching_at(analyst, name, 1), _watching_at(monitoring, name, 1)
            callers_file.write_text("monitoring tokenMON\nroot tokenROOT\n")
            assert monitoring.sample_sets() == []  # a call after the change: the file is read again
            steps.put(2)
            assert next(kept).progress.step == 2
            with pytest.raises(UnauthenticatedError) as ended:
                next(removed)
            assert ended.value.details.startswith("caller 'analyst' was removed or its token changed")
            steps.put(None)
            assert [update.state for update in kept][-1] == "succeeded"  # its watch ran to the end
    finally:
        steps.put(None)
        server.stop(0)


def test_a_rotated_token_file_ends_the_streams_opened_with_the_old_token(tmp_path, classifier_dir, monkeypatch):
    monkeypatch.setattr(auth, "RECHECK_INTERVAL_S", 0.0)
    token_file = tmp_path / "token"
    token_file.write_text("tokenOLD")
    server = start(tmp_path, classifier_dir, token_file=str(token_file))
    name, steps = _stepping_job(server)
    try:
        with client(server, "tokenOLD") as old, client(server, "tokenNEW") as new:
            opened_before = _watching_at(old, name, 1)
            token_file.write_text("tokenNEW")
            steps.put(2)  # no call comes after the change: the stream reads the file again itself
            with pytest.raises(UnauthenticatedError) as ended:
                next(opened_before)
            assert ended.value.details.startswith("the bearer token this call was made with was replaced ([server].token_file)")
            opened_after = _watching_at(new, name, 2)
            steps.put(3)
            assert next(opened_after).progress.step == 3
    finally:
        steps.put(None)
        server.stop(0)


def test_a_reload_that_read_the_callers_file_before_a_later_change_never_undoes_that_change(callers_file, monkeypatch):
    # Two calls reloading at once: the one that read the file first, finishing last, put
    # back a caller the newer file had removed, for good (the file's stamps were the new one's).
    from explaind.config import parse_callers

    monkeypatch.setattr(auth, "RECHECK_INTERVAL_S", 0.0)
    callers = auth.NamedCallers(parse_callers(CALLERS), str(callers_file))
    kept, revoked = "monitoring tokenMON\nanalyst tokenANA\n", "analyst tokenANA\n"
    first_read, later_reload_done = threading.Event(), threading.Event()

    def parse_stalling(text: str) -> dict[str, str]:
        """The first reload stalls after reading its file until the later reload has run
        (bounded: with reloads in turn, that one waits for this one)."""
        if text == kept:
            first_read.set()
            later_reload_done.wait(0.5)
        return parse_callers(text)

    monkeypatch.setattr(auth, "parse_callers", parse_stalling)
    callers_file.write_text(kept)
    first = threading.Thread(target=callers.grant_of, args=([("authorization", "Bearer tokenANA")],))
    first.start()
    assert first_read.wait(30)
    callers_file.write_text(revoked)
    later = threading.Thread(target=lambda: (callers.grant_of([("authorization", "Bearer tokenANA")]), later_reload_done.set()))
    later.start()
    first.join(30)
    later.join(30)
    assert callers.grant_of([("authorization", "Bearer tokenMON")]) is None
    assert callers.grant_of([("authorization", "Bearer tokenANA")]).caller == "analyst"


def test_a_call_carrying_another_bearer_token_beside_its_own_is_refused_whatever_their_order(callers_file):
    # A good token with an unknown one beside it (a removed caller's, a stale one a proxy adds) was let in,
    # where a server reading the first value only decides by their order; two callers' tokens already were refused.
    from explaind.config import parse_callers

    callers, token = auth.NamedCallers(parse_callers(CALLERS), str(callers_file)), auth.BearerToken("tokenONE")
    basic = [("authorization", "Basic dXNlcjpwYXNz")]  # no bearer token: not the caller's to answer for
    assert callers.grant_of(_bearer("tokenANA") * 2).caller == callers.grant_of(_bearer("tokenANA") + basic).caller == "analyst"
    assert token.grant_of(_bearer("tokenONE") * 2) is token.grant_of(_bearer("tokenONE") + basic) is not None
    for other in ("tokenMON", "tokenGONE"):
        for metadata in (_bearer("tokenANA") + _bearer(other), _bearer(other) + _bearer("tokenANA")):
            assert callers.grant_of(metadata) is None, metadata
    for metadata in (_bearer("tokenONE") + _bearer("tokenOLD"), _bearer("tokenOLD") + _bearer("tokenONE")):
        assert token.grant_of(metadata) is None, metadata


def test_a_real_call_carrying_an_unknown_bearer_token_beside_its_callers_is_unauthenticated(tmp_path, classifier_dir, callers_file):
    server = start(tmp_path, classifier_dir, callers_file=str(callers_file))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = channel.unary_unary("/explaind.v1.SampleSetService/ListSampleSets")
            assert call(b"", timeout=30, metadata=_bearer("tokenANA")) == b""
            with pytest.raises(grpc.RpcError) as refused:
                call(b"", timeout=30, metadata=_bearer("tokenANA") + _bearer("tokenGONE"))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0)


def test_a_callers_new_token_in_the_callers_file_revokes_the_grant_of_its_old_one_and_no_other(callers_file, monkeypatch):
    # A leaked token is replaced by giving its caller a new one: the streams opened with the
    # old one must end (in_force), though the caller's name is still in the file.
    from explaind.config import parse_callers

    monkeypatch.setattr(auth, "RECHECK_INTERVAL_S", 0.0)
    callers = auth.NamedCallers(parse_callers(CALLERS), str(callers_file), sleep=lambda _: None)
    old, other = (callers.grant_of([("authorization", f"Bearer {token}")]) for token in ("tokenANA", "tokenMON"))
    assert (old.caller, other.caller) == ("analyst", "monitoring")
    callers_file.write_text(CALLERS.replace("tokenANA", "tokenANA2"))
    assert not callers.in_force(old) and callers.in_force(other)
    assert callers.grant_of([("authorization", "Bearer tokenANA")]) is None
    new = callers.grant_of([("authorization", "Bearer tokenANA2")])
    assert new.caller == "analyst" and callers.in_force(new)


def test_a_check_while_another_call_reloads_the_callers_file_waits_for_that_reload(callers_file, monkeypatch):
    # The file's change was taken as seen once one call began reloading it: a call checked
    # meanwhile was let in with the token the change removed, and a stream sent on.
    from explaind.config import parse_callers

    monkeypatch.setattr(auth, "RECHECK_INTERVAL_S", 0.0)
    callers = auth.NamedCallers(parse_callers(CALLERS), str(callers_file))
    reading, checked = threading.Event(), threading.Event()

    def parse_stalling(text: str) -> dict[str, str]:
        """The reload stalls after reading the file until the other check is done (bounded:
        that check waits for this reload)."""
        reading.set()
        checked.wait(0.5)
        return parse_callers(text)

    monkeypatch.setattr(auth, "parse_callers", parse_stalling)
    callers_file.write_text("monitoring tokenMON\n")
    reload = threading.Thread(target=callers.grant_of, args=([("authorization", "Bearer tokenMON")],))
    reload.start()
    assert reading.wait(30)
    assert callers.grant_of([("authorization", "Bearer tokenANA")]) is None
    checked.set()
    reload.join(30)


def test_a_callers_file_rewritten_in_place_is_not_taken_half_written(callers_file, monkeypatch, caplog):
    # A reload that read `cat > callers` half-way took what parsed: the analyst's token
    # cut short, root left out; their streams ended and their calls were refused until
    # the next change.
    from explaind.config import parse_callers

    monkeypatch.setattr(auth, "RECHECK_INTERVAL_S", 0.0)
    monkeypatch.setattr(auth, "SETTLE_S", 60.0)  # the file just written is never taken without waiting
    complete = CALLERS + "newcomer tokenNEW\n"
    callers = auth.NamedCallers(parse_callers(CALLERS), str(callers_file), sleep=lambda _seconds: callers_file.write_text(complete))
    analyst = callers.grant_of([("authorization", "Bearer tokenANA")])
    callers_file.write_text(CALLERS[:CALLERS.index("tokenANA") + len("tokenA")])  # parses: monitoring, analyst tokenA
    assert callers.in_force(analyst)  # the writer finishes while the reload waits: its stream goes on
    assert callers.grant_of([("authorization", "Bearer tokenROOT")]).caller == "root"  # the next look takes the whole file
    assert callers.grant_of([("authorization", "Bearer tokenNEW")]).caller == "newcomer"
    assert callers.in_force(analyst) and callers.grant_of([("authorization", "Bearer tokenA")]) is None
    assert "changed while being read" in caplog.text and "rename it over" in caplog.text


def test_a_token_file_rewritten_in_place_is_not_taken_half_written(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "RECHECK_INTERVAL_S", 0.0)
    monkeypatch.setattr(auth, "SETTLE_S", 60.0)
    token_file = tmp_path / "token"
    token_file.write_text("tokenOLD")
    token = auth.BearerToken("tokenOLD", str(token_file), sleep=lambda _seconds: token_file.write_text("tokenNEWER"))
    old = token.grant_of([("authorization", "Bearer tokenOLD")])
    token_file.write_text("tokenNE")
    assert token.in_force(old)
    assert token.grant_of([("authorization", "Bearer tokenNEWER")]) is not None
    assert token.grant_of([("authorization", "Bearer tokenNE")]) is None and not token.in_force(old)


def test_a_file_left_unusable_is_read_again_at_each_check_without_making_calls_wait(tmp_path, monkeypatch, caplog):
    # Each check read it again (a failed reload looks again) and waited SETTLE_S for it to
    # settle, holding every call and stream check of the server meanwhile: 0.2 s of each second.
    monkeypatch.setattr(auth, "RECHECK_INTERVAL_S", 0.0)
    monkeypatch.setattr(auth, "SETTLE_S", 0.05)
    token_file, callers_file = tmp_path / "token", tmp_path / "callers"
    token_file.write_text("tokenOLD")
    callers_file.write_text(CALLERS)
    waits: list[float] = []
    token = auth.BearerToken("tokenOLD", str(token_file), sleep=waits.append)
    from explaind.config import parse_callers

    callers = auth.NamedCallers(parse_callers(CALLERS), str(callers_file), sleep=waits.append)
    token_file.write_text("token with spaces")
    callers_file.write_text(CALLERS + "a line without a token\n")
    time.sleep(0.1)  # neither is written again: each has kept its text for over SETTLE_S
    for _ in range(3):
        assert token.grant_of([("authorization", "Bearer tokenOLD")]) is not None
        assert callers.grant_of([("authorization", "Bearer tokenANA")]).caller == "analyst"
    assert waits == []
    assert "token file" in caplog.text and "callers file" in caplog.text


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _replace(path: Path, text: str) -> None:
    """Replace ``path`` whole with ``text``, as the docs ask (write another file, rename it over)."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    os.replace(new, path)


def test_a_token_or_callers_file_rotated_to_one_with_a_byte_order_mark_takes_effect(tmp_path, auth_clock):
    # A file saved again by Windows Notepad: its mark was read as a character of the token or name, and the reload failed.
    token_file, callers_file, waits = tmp_path / "token", tmp_path / "callers", []
    token_file.write_text("token1")
    callers_file.write_text("analyst tokenANA\n")
    from explaind.config import parse_callers

    token = auth.BearerToken("token1", str(token_file), sleep=waits.append)
    callers = auth.NamedCallers(parse_callers(callers_file.read_text()), str(callers_file), sleep=waits.append)
    _replace(token_file, "\ufefftoken2\r\n")
    _replace(callers_file, "\ufeffanalyst tokenNEW\r\n")
    auth_clock.advance(auth.RECHECK_INTERVAL_S)
    assert token.grant_of(_bearer("token2")) is not None and token.grant_of(_bearer("token1")) is None
    assert callers.grant_of(_bearer("tokenNEW")).caller == "analyst" and callers.grant_of(_bearer("tokenANA")) is None


def test_a_token_file_is_looked_at_once_a_recheck_interval_counted_from_the_last_look(tmp_path, auth_clock):
    # Every call, and every message of an open stream, asks whether the token still holds;
    # the file is looked at (a stat) no more than once a RECHECK_INTERVAL_S for all of them.
    token_file, waits = tmp_path / "token", []
    token_file.write_text("token1")
    token = auth.BearerToken("token1", str(token_file), sleep=waits.append)
    half = auth.RECHECK_INTERVAL_S / 2
    for new in (2, 3):
        _replace(token_file, f"token{new}")
        auth_clock.advance(half)
        assert token.grant_of(_bearer(f"token{new - 1}")) is not None, "looked at before the interval since the last look ended"
        auth_clock.advance(half)
        assert token.grant_of(_bearer(f"token{new}")) is not None and token.grant_of(_bearer(f"token{new - 1}")) is None
    assert waits == []  # renamed into place over SETTLE_S ago: taken at once


def test_a_token_file_written_under_settle_s_ago_is_taken_once_it_reads_the_same_settle_s_later(tmp_path, auth_clock):
    token_file, waits = tmp_path / "token", []
    token_file.write_text("tokenOLD")
    token = auth.BearerToken("tokenOLD", str(token_file), sleep=waits.append)
    for text, written_s_ago, waited in (("tokenNEW", auth.SETTLE_S / 2, [auth.SETTLE_S]), ("tokenNEWER", auth.SETTLE_S * 1.5, [])):
        waits.clear()
        token_file.write_text(text)
        auth_clock.advance(auth.RECHECK_INTERVAL_S)
        auth_clock.wall_ns = token_file.stat().st_ctime_ns + round(written_s_ago * 1e9)
        assert token.grant_of(_bearer(text)) is not None and waits == waited, text


def test_a_token_file_rewritten_between_the_look_and_the_read_is_not_taken_half_written(tmp_path, monkeypatch, auth_clock):
    # A file left alone for long is taken at once; a writer starting on it just as it is
    # read must still not have its first bytes taken as the token.
    token_file = tmp_path / "token"
    token_file.write_text("tokenOLD")
    writes = ["tokenNE", "tokenNEWER"]  # what the writer has written: at the read, then once done

    class WritingOs:
        """``os`` as auth sees it, a writer rewriting the file in place right after the
        reload's first look at it."""

        looks = 0

        def __getattr__(self, name: str):
            return getattr(os, name)

        def stat(self, path):
            status = os.stat(path)
            WritingOs.looks += 1
            if WritingOs.looks == 2:  # the reload's, before it reads (the first: the check for a change)
                token_file.write_text(writes[0])
            return status

    token = auth.BearerToken("tokenOLD", str(token_file), sleep=lambda _seconds: token_file.write_text(writes[1]))
    _replace(token_file, "tokenNEW")
    auth_clock.advance(auth.RECHECK_INTERVAL_S)  # renamed over SETTLE_S ago: no wait
    monkeypatch.setattr(auth, "os", WritingOs())
    old = token.grant_of(_bearer("tokenOLD"))
    assert old is not None and token.grant_of(_bearer(writes[0])) is None
    auth_clock.advance(auth.RECHECK_INTERVAL_S)
    assert token.grant_of(_bearer(writes[1])) is not None and not token.in_force(old)


def test_a_token_file_briefly_missing_keeps_the_token_in_force_until_its_new_one_arrives(tmp_path, caplog, auth_clock):
    # A rotation that deletes the file before writing the new one (`rm`, then a copy).
    token_file = tmp_path / "token"
    token_file.write_text("tokenOLD")
    token = auth.BearerToken("tokenOLD", str(token_file), sleep=lambda _seconds: None)
    old = token.grant_of(_bearer("tokenOLD"))
    token_file.unlink()
    auth_clock.advance(auth.RECHECK_INTERVAL_S)
    assert token.grant_of(_bearer("tokenOLD")) is old and token.in_force(old)
    assert f"token file {token_file} could not be read (FileNotFoundError); what was in force stays in force" in caplog.text
    _replace(token_file, "tokenNEW")
    auth_clock.advance(auth.RECHECK_INTERVAL_S)
    assert token.grant_of(_bearer("tokenNEW")) is not None and not token.in_force(old)


def test_a_token_or_callers_file_no_longer_utf8_is_logged_as_unreadable_and_keeps_what_was_in_force(tmp_path, callers_file, caplog,
                                                                                                       auth_clock):
    from explaind.config import parse_callers

    token_file = tmp_path / "token"
    token_file.write_text("tokenOLD")
    token = auth.BearerToken("tokenOLD", str(token_file), sleep=lambda _seconds: None)
    callers = auth.NamedCallers(parse_callers(CALLERS), str(callers_file), sleep=lambda _seconds: None)
    kept = token.grant_of(_bearer("tokenOLD")), callers.grant_of(_bearer("tokenANA"))
    for path in (token_file, callers_file):
        path.write_bytes(b"analyst tok\xe9n\n")  # Latin-1
    auth_clock.advance(auth.RECHECK_INTERVAL_S)
    assert token.in_force(kept[0]) and callers.in_force(kept[1])
    for kind, path in (("token", token_file), ("callers", callers_file)):
        assert f"{kind} file {path} could not be read (UnicodeDecodeError); what was in force stays in force" in caplog.text


def test_a_callers_file_written_again_with_the_same_callers_keeps_their_grants_and_logs_no_change(callers_file, caplog, auth_clock):
    # A Secret synced again rewrites the file: only a change of callers or tokens is one.
    from explaind.config import parse_callers

    callers = auth.NamedCallers(parse_callers(CALLERS), str(callers_file), sleep=lambda _seconds: None)
    grants = [callers.grant_of(_bearer(token)) for token in ("tokenMON", "tokenANA", "tokenROOT")]
    with caplog.at_level(logging.INFO, logger=auth.__name__):
        _replace(callers_file, "# synced again\n" + CALLERS)
        auth_clock.advance(auth.RECHECK_INTERVAL_S)
        assert all(callers.in_force(grant) for grant in grants) and "changed" not in caplog.text
        _replace(callers_file, CALLERS.replace("monitoring tokenMON\n", "").replace("tokenROOT", "tokenROOT2") + "newcomer tokenNEW\n")
        auth_clock.advance(auth.RECHECK_INTERVAL_S)
        assert [callers.in_force(grant) for grant in grants] == [False, True, False]
    assert f"callers file {callers_file} changed; 3 caller(s) now (added: newcomer; removed: monitoring; new token: root)" in caplog.text


def test_a_file_left_unusable_is_logged_once_and_again_if_it_breaks_again_after_a_fix(tmp_path, caplog, auth_clock):
    token_file = tmp_path / "token"
    token_file.write_text("tokenOLD")
    token = auth.BearerToken("tokenOLD", str(token_file), sleep=lambda _seconds: None)

    def warnings() -> int:
        return sum(record.levelname == "WARNING" and str(token_file) in record.getMessage() for record in caplog.records)

    for text, in_force, warned in (("two words", "tokenOLD", 1), ("tokenNEW", "tokenNEW", 1), ("two words", "tokenNEW", 2)):
        _replace(token_file, text)
        for _ in range(3):  # each look reads an unusable file again
            auth_clock.advance(auth.RECHECK_INTERVAL_S)
            assert token.grant_of(_bearer(in_force)) is not None
        assert warnings() == warned, text


def test_a_token_files_line_end_is_no_part_of_its_token_and_the_same_token_written_again_revokes_nothing(tmp_path, auth_clock):
    # `echo "$TOKEN" > token.new && mv token.new token` ends the file in a newline; a
    # Secret synced again (or a file touched) writes the same token anew.
    token_file = tmp_path / "token"
    token_file.write_text("tokenOLD")
    token = auth.BearerToken("tokenOLD", str(token_file), sleep=lambda _seconds: None)
    old = token.grant_of(_bearer("tokenOLD"))
    _replace(token_file, "tokenOLD\n")
    auth_clock.advance(auth.RECHECK_INTERVAL_S)
    assert token.in_force(old), "the same token, written again, ended the streams opened with it"
    _replace(token_file, "tokenNEW\n")
    auth_clock.advance(auth.RECHECK_INTERVAL_S)
    assert token.grant_of(_bearer("tokenNEW")) is not None and not token.in_force(old)


def test_an_admin_missing_from_a_reloaded_callers_file_is_logged_once_while_it_stays_missing(callers_file, caplog, auth_clock):
    from explaind.config import parse_callers

    callers = auth.NamedCallers(parse_callers(CALLERS), str(callers_file), admins=("root",), sleep=lambda _seconds: None)
    without_root = CALLERS.replace("root tokenROOT\n", "")
    for text, warned in ((without_root, 1), (without_root + "newcomer tokenNEW\n", 1), (CALLERS, 1), (without_root, 2)):
        _replace(callers_file, text)
        auth_clock.advance(auth.RECHECK_INTERVAL_S)
        assert (callers.grant_of(_bearer("tokenROOT")) is None) == (text != CALLERS)
        assert caplog.text.count("lacks admin(s) root of [server].admins") == warned, text


def test_a_call_is_its_tokens_one_caller_and_one_with_two_callers_tokens_is_refused(callers_file):
    callers = auth.NamedCallers({"analyst": "tokenANA", "monitoring": "tokenMON"}, str(callers_file))
    assert callers.grant_of([("authorization", "Bearer tokenANA")]).caller == "analyst"
    assert callers.grant_of([("authorization", "bearer tokenMON"), ("authorization", "Bearer tokenMON")]).caller == "monitoring"
    for wrong in ("tokenANAX", "tokenAN", "TOKENANA", "tokenANA "):
        assert callers.grant_of([("authorization", f"Bearer {wrong}")]) is None, wrong
    # Either caller's call: neither, rather than whichever the file names last.
    assert callers.grant_of([("authorization", "Bearer tokenANA"), ("authorization", "Bearer tokenMON")]) is None


def test_calling_as_makes_the_caller_current_for_its_block_only():
    # The servicers' threads serve call after call: a caller left current would be the next call's.
    assert auth.current_caller() is None
    with auth.calling_as("analyst"):
        with auth.calling_as("root"):
            assert auth.current_caller() == "root"
        assert auth.current_caller() == "analyst"
    assert auth.current_caller() is None


def test_a_grant_shows_its_caller_and_never_its_token(callers_file):
    # A grant may reach a log line (a refusal's message, a debugging print) where its token must not.
    grant = auth.NamedCallers({"analyst": "tokenANA"}, str(callers_file)).grant_of(_bearer("tokenANA"))
    assert repr(grant) == str(grant) == "Grant(caller='analyst')"
    assert repr(auth.BearerToken("tokenONE").grant_of(_bearer("tokenONE"))) == "Grant(caller='')"


def test_one_named_caller_holds_at_most_half_of_the_stream_and_wait_slots():
    from contextlib import ExitStack

    from explaind.service.interceptors import HeldCalls

    held = HeldCalls(8)
    with ExitStack() as stack:
        assert all(stack.enter_context(held.slot(caller="analyst")) for _ in range(4))
        refused = stack.enter_context(held.slot(caller="analyst"))
        assert not refused and "(at most 8, 4 of them for one caller)" in held.refusal(refused.refused)
        assert refused.refused == ("HELD_CALLS_PER_CALLER_EXCEEDED", "[server].max_workers", 4, "caller:analyst",
                                   "streams, waits and inline rankings open")
        assert stack.enter_context(held.slot(caller="monitoring")) and stack.enter_context(held.slot())
    # Each slot and share went back as its block ended.
    with ExitStack() as stack:
        assert all(stack.enter_context(held.slot(caller="analyst")) for _ in range(4))


def test_a_refused_slot_names_the_limit_that_had_no_room_not_a_share_with_room_left():
    # The caller's share counts the refused call itself until its block ends, and the
    # public share a public call's: read afterwards, both looked full when all slots were.
    from contextlib import ExitStack

    from explaind.service.interceptors import HeldCalls

    held = HeldCalls(4)  # 2 for one caller, 1 without a token
    with ExitStack() as stack:
        assert all(stack.enter_context(held.slot(caller=caller)) for caller in ("analyst", "monitoring", "monitoring", "root"))
        with held.slot(caller="analyst") as refused:  # it holds 1 of its 2
            assert refused.refused == ("HELD_CALLS_EXCEEDED", "[server].max_workers", 4, "server", "streams, waits and inline rankings open")
            assert "(at most 4, half of [server].max_workers)" in held.refusal(refused.refused)
        with held.slot(public=True) as refused:  # none without a token is open
            assert refused.refused is not None and refused.refused.reason == "HELD_CALLS_EXCEEDED"
        with held.slot(caller="monitoring") as refused:
            assert refused.refused is not None and refused.refused[::3] == ("HELD_CALLS_PER_CALLER_EXCEEDED", "caller:monitoring")
    with held.slot(public=True) as open_slot, held.slot(public=True) as refused:
        assert open_slot and refused.refused is not None and refused.refused[:3:2] == ("HELD_CALLS_WITHOUT_TOKEN_EXCEEDED", 1)
        assert "(at most 4, 1 of them for calls without a token)" in held.refusal(refused.refused)


def test_a_callers_streams_are_held_to_its_share_of_the_slots(callers_file):
    from explaind.metrics import Metrics
    from explaind.service.interceptors import CallerShares, HeldCalls, ServiceInterceptor
    from explaind.v1 import common_pb2

    release = threading.Event()

    def watch(request, context):
        yield common_pb2.Image()
        release.wait(10)

    method = grpc.unary_stream_rpc_method_handler(watch, request_deserializer=common_pb2.Image.FromString,
                                                  response_serializer=common_pb2.Image.SerializeToString)
    callers = auth.NamedCallers({"monitoring": "tokenMON", "analyst": "tokenANA", "root": "tokenROOT"}, str(callers_file))
    interceptor = ServiceInterceptor(Metrics(), callers, max_send_bytes=1 << 20, held_calls=HeldCalls(2),
                                     unary_shares=CallerShares(1))  # one slot per caller
    server = grpc.server(ThreadPoolExecutor(4), interceptors=[interceptor], handlers=[grpc.method_handlers_generic_handler("test.Service", {"Watch": method})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            def open_stream(token: str):
                stream = channel.unary_stream("/test.Service/Watch", response_deserializer=common_pb2.Image.FromString)(
                    b"", timeout=10, metadata=(("authorization", f"Bearer {token}"),))
                next(stream)
                return stream

            first = open_stream("tokenANA")
            with pytest.raises(grpc.RpcError) as refused:
                open_stream("tokenANA")
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "(at most 2, 1 of them for one caller)" in refused.value.details()
            assert limit_details(trailing_status(refused.value.trailing_metadata())) == (
                "HELD_CALLS_PER_CALLER_EXCEEDED", {"setting": "[server].max_workers", "limit": "1"},
                [("caller:analyst", "streams, waits and inline rankings open")])
            other = open_stream("tokenMON")
            release.set()
            assert list(first) == list(other) == []
    finally:
        release.set()
        server.stop(None)


def test_calls_without_a_token_hold_at_most_a_quarter_of_the_slots_and_a_full_server_says_which_limit_it_met():
    from contextlib import ExitStack

    from explaind.service.interceptors import HeldCalls

    held = HeldCalls(8)
    with ExitStack() as stack:
        assert all(stack.enter_context(held.slot(public=True)) for _ in range(2))
        refused = stack.enter_context(held.slot(public=True))
        assert not refused and "(at most 8, 2 of them for calls without a token)" in held.refusal(refused.refused)
        assert refused.refused[:3] == ("HELD_CALLS_WITHOUT_TOKEN_EXCEEDED", "[server].max_workers", 2)
        assert all(stack.enter_context(held.slot(caller=caller)) for caller in ["analyst"] * 4 + ["monitoring"] * 2)
        # Every slot is held, none of them by "auditor": its refusal names the server's limit, not its share.
        refused = stack.enter_context(held.slot(caller="auditor"))
        assert not refused and held.refusal(refused.refused).endswith("(at most 8, half of [server].max_workers); try again later")
        assert refused.refused == ("HELD_CALLS_EXCEEDED", "[server].max_workers", 8, "server", "streams, waits and inline rankings open")


def test_a_server_holds_streams_to_half_of_its_max_workers(tmp_path, classifier_dir):
    # The other half of the threads stay for short calls: with max_workers 8, four calls
    # may wait, one of them without a token (health's Watch needs none).
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = start(tmp_path, classifier_dir, max_workers=8, token="tokenONE")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            first = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert next(first).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as refused:
                next(health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30))
            first.cancel()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "(at most 4, 1 of them for calls without a token)" in refused.value.details()
    finally:
        server.stop(0)


def test_a_callers_predictions_and_uploads_hold_at_most_half_of_the_threads_so_another_caller_is_served(
        tmp_path, classifier_dir, callers_file, monkeypatch):
    # A security review's reproduction: with 4 threads, one caller's 8 Predicts, each waiting
    # to decode, took all 4, and another caller's Predict waited ~23 s for a thread. Now the
    # caller runs 2 of them (half of max_workers) and its others are refused at once.
    decode, entered, release = convert.decode_image, threading.Semaphore(0), threading.Event()

    def decode_blocking_the_analyst(*args, **kwargs):
        if auth.current_caller() == "analyst":
            entered.release()
            release.wait(30)
        return decode(*args, **kwargs)

    monkeypatch.setattr(convert, "decode_image", decode_blocking_the_analyst)
    server = start(tmp_path, classifier_dir, max_workers=4, callers_file=str(callers_file))
    try:
        with client(server, "tokenANA") as analyst, client(server, "tokenMON") as monitoring, ThreadPoolExecutor(2) as pool:
            held = [pool.submit(analyst.predict, [IMAGE]) for _ in range(2)]
            for _ in held:
                assert entered.acquire(timeout=30)  # both decoding, in two of the four threads
            # Refused before the call runs: AppendSamples to a set that does not exist is RESOURCE_EXHAUSTED, not NOT_FOUND.
            for refused_call in (lambda: analyst.predict([IMAGE]), lambda: analyst.create_sample_set([IMAGE], [0], sample_set_id="more"),
                                 lambda: analyst.append_samples("more", [IMAGE], [0])):
                with pytest.raises(ResourceExhaustedError) as refused:
                    refused_call()
                assert refused.value.details == (
                    "this caller's Predict, CreateSampleSet and AppendSamples calls in progress hold its share of the server's threads "
                    "(at most 2 at once, half of [server].max_workers, which the server's operator may raise); retry once one of them "
                    "has answered, or send fewer at once")
                assert (refused.value.reason, refused.value.quota_violations) == (
                    "CALLS_PER_CALLER_EXCEEDED", [("caller:analyst", "Predict, CreateSampleSet, AppendSamples calls in progress")])
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, pytest.raises(grpc.RpcError) as refused_call:  # what any gRPC client reads
                channel.unary_unary("/explaind.v1.InferenceService/Predict")(b"", timeout=30, metadata=(("authorization", "Bearer tokenANA"),))
            assert limit_details(trailing_status(refused_call.value.trailing_metadata())) == (
                "CALLS_PER_CALLER_EXCEEDED", {"setting": "[server].max_workers", "limit": "2"},
                [("caller:analyst", "Predict, CreateSampleSet, AppendSamples calls in progress")])
            assert len(monitoring.predict([IMAGE])) == 1  # served while the analyst's share is full
            release.set()
            assert [len(call.result(timeout=30)) for call in held] == [1, 1]
            assert len(analyst.predict([IMAGE])) == 1  # the share came back as the calls answered
            assert analyst.model_metadata().limits.max_calls_per_caller == 2  # which the SDK's predict keeps to
    finally:
        release.set()
        server.stop(0)


def test_the_one_caller_of_a_server_without_named_callers_may_use_more_than_half_of_the_threads_for_predictions(
        tmp_path, classifier_dir, monkeypatch):
    # The share is one named caller's against the others: a server with one token (or none)
    # has one caller, whose Predicts beyond half of max_workers must run, not be refused.
    decode, entered, release = convert.decode_image, threading.Semaphore(0), threading.Event()

    def decode_blocking(*args, **kwargs):
        entered.release()
        release.wait(30)
        return decode(*args, **kwargs)

    monkeypatch.setattr(convert, "decode_image", decode_blocking)
    server = start(tmp_path, classifier_dir, max_workers=4, token="tokenONE")
    try:
        with client(server, "tokenONE") as only, ThreadPoolExecutor(3) as pool:
            # No share to tell: the SDK's predict kept its requests in flight under one that did not apply.
            assert only.model_metadata().limits.max_calls_per_caller == 0
            held = [pool.submit(only.predict, [IMAGE]) for _ in range(3)]
            for call in held:
                call.add_done_callback(lambda _: entered.release())  # a refused call ends the wait below too
            for _ in held:
                assert entered.acquire(timeout=30)
            assert not any(call.done() for call in held)  # all three decoding at once, past the 2 of a named caller's share
            release.set()
            assert [len(call.result(timeout=30)) for call in held] == [1, 1, 1]
    finally:
        release.set()
        server.stop(0)


def test_a_stream_of_a_client_gone_silent_gives_its_slot_back_once_the_servers_ping_goes_unanswered(tmp_path, classifier_dir, monkeypatch):
    # A client whose host went down (no FIN) held its health Watch's slot, and a thread,
    # for as long as its deadline, or forever without one: the only slot for calls
    # without a token here, the next prober's Watch was refused.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from conftest import StallingRelay
    from explaind.service import server as explaind_server

    monkeypatch.setattr(explaind_server, "KEEPALIVE_TIME_MS", 200)
    monkeypatch.setattr(explaind_server, "KEEPALIVE_TIMEOUT_MS", 2000)  # an answer late on a loaded machine is no silence
    server = start(tmp_path, classifier_dir, max_workers=8, token="tokenONE")
    relay = StallingRelay(server.port)
    try:
        with grpc.insecure_channel(relay.target) as gone, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            watch = health_pb2_grpc.HealthStub(gone).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            time.sleep(0.5)  # the pings gRPC sends on a response answered: the keepalive's to find the silence
            relay.stall()
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 20
            while True:
                call = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
                try:
                    assert next(call).status == health_pb2.HealthCheckResponse.SERVING
                    break
                except grpc.RpcError as refused:
                    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, refused
                    time.sleep(0.1)
                finally:
                    call.cancel()
    finally:
        relay.close()
        server.stop(0)


def test_the_idle_connection_of_a_client_gone_silent_is_closed_once_the_servers_ping_goes_unanswered(tmp_path, classifier_dir, monkeypatch):
    # The server pinged a connection only while a call was open: one a client left idle
    # when its host went down (no FIN) held a descriptor until the server restarted.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from conftest import StallingRelay
    from explaind.service import server as explaind_server

    monkeypatch.setattr(explaind_server, "KEEPALIVE_TIME_MS", 200)
    monkeypatch.setattr(explaind_server, "KEEPALIVE_TIMEOUT_MS", 2000)  # an answer late on a loaded machine is no silence
    server = start(tmp_path, classifier_dir)
    relay = StallingRelay(server.port)
    try:
        with grpc.insecure_channel(relay.target) as gone:  # a channel of gRPC's defaults: it sends no ping
            health = health_pb2_grpc.HealthStub(gone)
            assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30).status == health_pb2.HealthCheckResponse.SERVING
            relay.drop_open_connections()
            assert relay.server_hung_up.wait(20)  # generous: a ping every 0.2 s, unanswered for 2 s
    finally:
        relay.close()
        server.stop(0)


def test_an_idle_client_of_the_health_port_keeps_its_connection(tmp_path, monkeypatch):
    # The SDK pings an idle connection; the health port's server, of gRPC's defaults, took
    # that for abuse: a Client kept on it had its connection closed at the 4th idle ping
    # (GOAWAY too_many_pings, logged as an error) and its pings slowed down each time.
    from conftest import free_port
    from explaind.client import _client
    from explaind.service import server as explaind_server

    monkeypatch.setattr(_client, "KEEPALIVE_TIME_MS", 300)
    monkeypatch.setattr(explaind_server, "CLIENT_PING_INTERVAL_MIN_MS", 100)
    loading = ExplaindServer(default_config().replace("server", port=0, health_port=free_port(), data_dir=str(tmp_path)))  # models not loaded
    try:
        loading.start()
        with Client(f"127.0.0.1:{loading.health_port}", timeout=5, retry=False) as prober:
            assert prober.health() == "NOT_SERVING"
            states: queue.Queue[grpc.ChannelConnectivity] = queue.Queue()
            prober._channel.subscribe(states.put)
            assert states.get(timeout=5) == grpc.ChannelConnectivity.READY
            time.sleep(5)  # 4 pings without a call (gRPC sends one a second at most)
            assert states.empty()
    finally:
        loading.stop(0)


def test_a_start_refused_the_health_port_frees_the_grpc_and_metrics_ports_it_had_bound(tmp_path):
    # The health port binds last: a start it fails had bound gRPC's port and served
    # /metrics. Both must be free again, or the operator who frees the health port and
    # starts again (a supervisor's restart, in the same process or the next) finds gRPC's
    # port or the metrics port taken by the server that failed.
    import socket

    from conftest import free_port

    port, metrics_port = free_port(), free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        health_port = busy.getsockname()[1]
        refused = ExplaindServer(default_config().replace("server", host="127.0.0.1", port=port, metrics_port=metrics_port,
                                                          health_port=health_port, data_dir=str(tmp_path)))
        try:
            with pytest.raises(OSError, match=rf"^\[server\]\.health_port: cannot bind health 127\.0\.0\.1:{health_port}: another process"):
                refused.start()
        finally:
            refused.store.close()  # all that serve() does after a refused start: the start frees what it bound
    for freed in (port, metrics_port):
        with socket.socket() as probe:  # no SO_REUSEADDR: a socket still bound to the port, listening or not, refuses this bind
            probe.bind(("127.0.0.1", freed))


@pytest.mark.parametrize(("text", "problem"), [
    ("a tokenA\nb tokenA\n", "line 2: the token of 'b' is that of line 1 too"),
    ("# c\nBad tokenB\n", "line 2: the first word is no caller name (it must match"),
    ("tokenA analyst\n", "line 1: the first word is no caller name"),  # TOKEN NAME: the token is never quoted
    (f"{HEX_TOKEN} analyst\n", "line 1: the first word is 64 hex digits, a token rather than a caller name"),  # a valid name otherwise
    ("a tokenA extra\n", "line 1: expected NAME TOKEN, got 3 word(s)"),
    ("a tokenA\n\na tokenB\n", "line 3: caller 'a' is named on line 1 too"),
    ("# none yet\n\n", "names no caller"),
])
def test_a_bad_callers_file_fails_the_start_naming_its_line(tmp_path, classifier_dir, text, problem):
    path = tmp_path / "callers"
    path.write_text(text)
    config = default_config().replace("classifier", path=str(classifier_dir)).replace("server", port=0, data_dir=str(tmp_path / "data"),
                                                                                    callers_file=str(path))
    with pytest.raises(ConfigError, match=r"^\[server\]\.callers_file: ") as refused:
        ExplaindServer(config)
    assert problem in str(refused.value) and not {"tokenA", "tokenB", HEX_TOKEN} & set(re.findall(r"\w+", str(refused.value)))


def test_callers_exclude_a_single_token_and_admins_must_be_callers(tmp_path, callers_file):
    with pytest.raises(ConfigError, match=r"\[server\]\.callers_file .* or \[server\]\.token "):
        default_config().replace("server", callers_file=str(callers_file), token="tokenONE")
    with pytest.raises(ConfigError, match=r"\[server\]\.callers_file .* or \[server\]\.token_file "):
        default_config().replace("server", callers_file=str(callers_file), token_file=str(callers_file))
    with pytest.raises(ConfigError, match=r"\[server\]\.admins: 'nobody' is not a caller"):
        ExplaindServer(default_config().replace("server", port=0, data_dir=str(tmp_path / "data"), callers_file=str(callers_file),
                                                admins=("nobody",)))


def test_objects_made_without_named_callers_stay_open_to_every_caller(tmp_path, classifier_dir, callers_file):
    server = start(tmp_path, classifier_dir, token="tokenONE")
    try:
        with client(server, "tokenONE") as anyone:
            made = anyone.create_sample_set([IMAGE] * 2, [0, 1], sample_set_id="legacy")
            operation = anyone.evaluate_sample_set("legacy")
            operation.result(timeout=60)
            assert (made.owner, operation.owner) == ("", "")
    finally:
        server.stop(0)
    server = start(tmp_path, classifier_dir, callers_file=str(callers_file), admins=("root",))
    try:
        with client(server, "tokenANA") as analyst:
            assert analyst.sample_set("legacy").owner == ""
            analyst.append_samples("legacy", [IMAGE], [0])
            analyst.delete_operation(operation.name)
            analyst.delete_sample_set("legacy")
    finally:
        server.stop(0)


def test_a_server_restarted_without_named_callers_lets_its_caller_change_what_named_callers_own(tmp_path, classifier_dir, callers_file):
    # One token (or none) names no caller: such a call may change anything, as before callers existed.
    server = start(tmp_path, classifier_dir, callers_file=str(callers_file), admins=("root",))
    try:
        with client(server, "tokenMON") as monitoring:
            monitoring.create_sample_set([IMAGE] * 10, [i % 2 for i in range(10)], sample_set_id="owned")
            edit = monitoring.edit_head("owned", 1, [0], max_epochs=1)
            version = edit.result(timeout=60).version
            assert version.owner == "monitoring"
    finally:
        server.stop(0)
    server = start(tmp_path, classifier_dir, token="tokenONE")
    try:
        with client(server, "tokenONE") as anyone:
            assert anyone.sample_set("owned").owner == "monitoring"
            anyone.append_samples("owned", [IMAGE], [0])
            assert anyone.promote_head_version(version.version_id).version.active
            anyone.rollback_head_version()
            anyone.delete_head_version(version.version_id)
            anyone.delete_operation(edit.name)
            anyone.delete_sample_set("owned")
    finally:
        server.stop(0)


def test_in_process_calls_name_no_caller_and_may_change_the_head_even_with_admins_set():
    # The engine used in-process passes caller None: [server].admins restricts named callers only.
    from explaind.errors import PermissionDenied
    from explaind.ownership import Ownership

    ownership = Ownership(("root",))
    ownership.require_head_changer(None, "promote a head version")
    ownership.require_head_changer("root", "promote a head version")
    with pytest.raises(PermissionDenied, match="only an admin"):
        ownership.require_head_changer("analyst", "promote a head version")


def test_without_admins_every_named_caller_may_change_the_served_head(tmp_path, classifier_dir, callers_file):
    # [server].admins restricts the served head to its callers; unset, any caller promotes and rolls back.
    server = start(tmp_path, classifier_dir, callers_file=str(callers_file))
    try:
        with client(server, "tokenMON") as monitoring, client(server, "tokenANA") as analyst:
            monitoring.create_sample_set([IMAGE] * 10, [i % 2 for i in range(10)], sample_set_id="train")
            version = monitoring.edit_head("train", 1, [0], max_epochs=1).result(timeout=60).version
            assert analyst.promote_head_version(version.version_id).version.active
            analyst.rollback_head_version()
            assert "owned by caller 'monitoring'" in denied(analyst.delete_head_version, version.version_id)
    finally:
        server.stop(0)


def test_the_release_before_owners_still_writes_a_store_that_has_them(tmp_path):
    # Releases before owners insert rows by position (every column): the owners are kept
    # in tables of their own, and the schema version stays.
    import sqlite3

    from explaind.store import SQLiteStore
    from explaind.store.sqlite import SCHEMA_VERSION

    SQLiteStore(tmp_path / "data").close()
    with sqlite3.connect(tmp_path / "data" / "explaind.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 1
        db.execute("INSERT INTO jobs VALUES ('0123456789abcdef', 'evaluate', 'SUCCEEDED', 1, 1, 2, 0, 0, '', 0, '', '', X'', '[]')")
        db.execute("INSERT INTO sample_sets VALUES ('old', '', 1, 1)")
    store = SQLiteStore(tmp_path / "data")
    try:
        assert (store.get_job("0123456789abcdef").owner, store.get_sample_set("old").owner) == (None, None)
    finally:
        store.close()


def test_an_owners_jobs_of_a_kind_and_state_are_listed_from_a_store_the_releases_before_wrote_and_after_they_write_again(tmp_path):
    # job_owners.kind and .state are added at open and kept by triggers: the jobs a store
    # already had are filled in, and so are those the releases before (which insert
    # (job_id, owner, create_time)) store after a rollback, and the states they change.
    import sqlite3

    from explaind.store import SQLiteStore

    SQLiteStore(tmp_path / "data").close()
    path = tmp_path / "data" / "explaind.sqlite3"
    without_kind = ("DROP TRIGGER job_owners_kind_on_insert; DROP INDEX job_owners_by_owner_and_kind; "
                    "ALTER TABLE job_owners DROP COLUMN kind;")
    without_state = ("DROP TRIGGER job_owners_state_on_insert; DROP TRIGGER job_owners_state_on_update; DROP INDEX job_owners_by_owner_and_state; "
                     "DROP INDEX job_owners_by_owner_kind_and_state; ALTER TABLE job_owners DROP COLUMN state;")
    with sqlite3.connect(path) as db:  # the store as the release before both left it: no columns, no triggers, no indexes
        db.executescript(without_state + without_kind)

    def stored_by_the_release_before(job_id: str, kind: str, create_time: float) -> None:
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("INSERT INTO jobs VALUES (?, ?, 'running', ?, 1, 2, 0, 0, '', 0, '', '', X'', '[]')", (job_id, kind, create_time))
            db.execute("INSERT INTO job_owners (job_id, owner, create_time) VALUES (?, 'analyst', ?)", (job_id, create_time))

    def ended_by_the_release_before(job_id: str) -> None:
        with sqlite3.connect(path) as db:
            db.execute("UPDATE jobs SET state = 'succeeded' WHERE id = ?", (job_id,))

    stored_by_the_release_before("0000000000000001", "edit_head", 1.0)
    stored_by_the_release_before("0000000000000002", "evaluate_sample_set", 2.0)
    SQLiteStore(tmp_path / "data").close()
    with sqlite3.connect(path) as db:  # rolled back to the release with kind, not state
        db.executescript(without_state)
    stored_by_the_release_before("0000000000000003", "edit_head", 3.0)
    SQLiteStore(tmp_path / "data").close()
    stored_by_the_release_before("0000000000000004", "edit_head", 4.0)  # rolled back to either, it writes again
    ended_by_the_release_before("0000000000000003")
    store = SQLiteStore(tmp_path / "data")
    try:
        assert [job.job_id for job in store.list_jobs(kind="edit_head", owner="analyst")] == ["0000000000000004", "0000000000000003", "0000000000000001"]
        assert [job.job_id for job in store.list_jobs(kind="evaluate_sample_set", owner="analyst")] == ["0000000000000002"]
        assert [job.job_id for job in store.list_jobs(state="running", owner="analyst")] == ["0000000000000004", "0000000000000002", "0000000000000001"]
        assert [job.job_id for job in store.list_jobs(kind="edit_head", state="succeeded", owner="analyst")] == ["0000000000000003"]
    finally:
        store.close()


def _refused_field(call, *args) -> tuple[str, str]:
    """(field, message) of the INVALID_ARGUMENT the call must raise."""
    with pytest.raises(ExplaindError) as refused:
        call(*args)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT, refused.value
    return refused.value.field or "", refused.value.details


def test_lists_keep_to_one_owner_page_by_page_with_tokens_bound_to_it(tmp_path, classifier_dir, callers_file):
    """A monitoring pipeline sharing the server with analysts lists its own operations and
    sets (owner=): pages of only its objects, each token good for that owner's listing alone."""
    from explaind.v1 import operations_pb2, sample_sets_pb2

    server = start(tmp_path, classifier_dir, callers_file=str(callers_file), admins=("root",))
    try:
        with client(server, "tokenMON") as monitoring, client(server, "tokenANA") as analyst:
            for set_id in ("m1", "a1", "m2", "a2", "m3"):
                (monitoring if set_id[0] == "m" else analyst).create_sample_set([IMAGE] * 2, [0, 1], sample_set_id=set_id)
            submitted = [caller.evaluate_sample_set("m1") for caller in (monitoring, analyst, monitoring, analyst, monitoring)]
            for operation in submitted:
                operation.result(timeout=60)
            mine = [operation.name for operation in submitted[::2]][::-1]  # newest first

            # Reads stay open: anyone may list a caller's objects.
            assert [s.sample_set_id for s in analyst.sample_sets(owner="monitoring")] == ["m1", "m2", "m3"]
            assert [s.sample_set_id for s in monitoring.sample_sets(owner="analyst")] == ["a1", "a2"]
            assert len(monitoring.sample_sets()) == 5 and monitoring.sample_sets(owner="root") == []
            assert [op.name for op in analyst.operations(owner="monitoring")] == mine
            assert [op.name for op in analyst.operations(owner="monitoring", limit=2)] == mine[:2]
            assert [op.name for op in analyst.operations(kind="evaluate_sample_set", state="succeeded", owner="analyst")] == [
                op.name for op in submitted[1::2][::-1]]

            def list_sets(**fields: object) -> sample_sets_pb2.ListSampleSetsResponse:
                return monitoring._call("sample_sets", "ListSampleSets", sample_sets_pb2.ListSampleSetsRequest(**fields))

            def list_operations(**fields: object) -> operations_pb2.ListOperationsResponse:
                return monitoring._call("operations", "ListOperations", operations_pb2.ListOperationsRequest(**fields))

            first = list_sets(owner="monitoring", page_size=2)
            second = list_sets(owner="monitoring", page_size=2, page_token=first.next_page_token)
            assert [s.sample_set_id for page in (first, second) for s in page.sample_sets] == ["m1", "m2", "m3"]
            assert second.next_page_token == ""
            first_operations = list_operations(owner="monitoring", page_size=2)
            second_operations = list_operations(owner="monitoring", page_size=2, page_token=first_operations.next_page_token)
            assert [op.name for page in (first_operations, second_operations) for op in page.operations] == mine
            everyone = list_sets(page_size=1).next_page_token
            for listing, token in ((list_sets, first.next_page_token), (list_operations, first_operations.next_page_token)):
                for other in ("analyst", ""):
                    field, message = _refused_field(lambda: listing(owner=other, page_token=token))
                    assert field == "page_token" and "caller 'monitoring'" in message, message
            field, message = _refused_field(lambda: list_sets(owner="monitoring", page_token=everyone))
            assert field == "page_token" and "everyone's" in message, message
            for bad in ("Monitoring", "-x", "a b", "x" * 65):
                for listing in (list_sets, list_operations):
                    field, message = _refused_field(lambda: listing(owner=bad))
                    assert field == "owner" and "no caller name" in message, message
            assert "list_owner_filter" in monitoring.model_metadata().capabilities
    finally:
        server.stop(0)


@pytest.mark.parametrize("counted, few, many", [("other callers'", (12, 10), (12, 400)), ("the owner's own", (10, 12), (400, 12))])
def test_one_owners_list_page_costs_the_same_however_many_objects_it_or_others_have(tmp_path, counted, few, many):
    """A page of one owner's operations or sets reads that page, in list order by an index,
    neither other callers' objects nor the owner's others (20,000 of a pipeline's own)."""
    from conftest import vm_steps
    from explaind.store import JobRecord, SampleRecord, SQLiteStore

    def store_with(path: Path, own: int, others: int) -> SQLiteStore:
        """``own`` sets and operations of "monitoring" among ``others`` of "analyst" each,
        interleaved in time (an analyst's newer than every one of the pipeline's too)."""
        store = SQLiteStore(path)
        total = own + others
        mine = {k * total // own for k in range(own)}
        for i in range(3):  # the owner's oldest jobs, of a kind it runs rarely: a page of them follows all the others
            store.insert_job(JobRecord(f"edit-{i}", "edit_head", "succeeded", -1.0 - i, owner="monitoring"))
        for i in range(total):
            owner = "monitoring" if i in mine else "analyst"
            store.create_sample_set(f"set-{i:04d}", "", [SampleRecord(f"{i:064x}", 0)], owner=owner)
            store.insert_job(JobRecord(f"job-{i:04d}", "evaluate_sample_set", "succeeded", float(i), owner=owner))
        return store

    few_store, many_store = store_with(tmp_path / "few", *few), store_with(tmp_path / "many", *many)

    def pages(store: SQLiteStore, own: int) -> dict[str, object]:
        sets = store.list_sample_sets(owner="monitoring", limit=1000)
        jobs = [job for job in store.list_jobs(owner="monitoring", limit=1000) if job.kind == "evaluate_sample_set"]
        assert [job.job_id for job in store.list_jobs(kind="edit_head", owner="monitoring")] == ["edit-0", "edit-1", "edit-2"]
        assert len(sets) == len(jobs) == own and {s.owner for s in sets} == {j.owner for j in jobs} == {"monitoring"}
        assert [s.sample_set_id for s in sets] == sorted(s.sample_set_id for s in sets)  # oldest first
        assert [j.job_id for j in jobs] == sorted((j.job_id for j in jobs), reverse=True)  # newest first
        return {"first set page": lambda: store.list_sample_sets(owner="monitoring", limit=5),
                "next set page": lambda: store.list_sample_sets(owner="monitoring", after=(sets[4].create_time, sets[4].sample_set_id), limit=5),
                "first operations page": lambda: store.list_jobs(owner="monitoring", limit=5),
                "next operations page": lambda: store.list_jobs(owner="monitoring", after=(jobs[4].create_time, jobs[4].job_id), limit=5),
                "operations page of a kind and state": lambda: store.list_jobs(kind="evaluate_sample_set", state="succeeded", owner="monitoring",
                                                                               limit=5),
                "operations page of the owner's rarer kind": lambda: store.list_jobs(kind="edit_head", owner="monitoring", limit=5)}

    few_pages, many_pages = pages(few_store, few[0]), pages(many_store, many[0])
    for name, call in few_pages.items():
        few_steps, many_steps = vm_steps(few_store, call), vm_steps(many_store, many_pages[name])
        assert many_steps < 1.2 * few_steps, (counted, name, few_steps, many_steps)
    for store in (few_store, many_store):
        store.close()


def test_a_page_of_one_state_costs_the_same_however_many_operations_of_other_states_are_in_between(tmp_path):
    """A pipeline polls its running operations (state=, with its owner= and kind= or not)
    among the thousands it finished: a page read the owner's (or the kind's) jobs in every
    other state in between (400 of them: up to 30 times the VM steps of 10; now the same)."""
    from conftest import vm_steps
    from explaind.store import RUNNING, JobRecord, SQLiteStore

    def store_with(path: Path, between: int) -> SQLiteStore:
        """12 running edits of "monitoring", ``between`` other jobs before each but the
        oldest: every other (kind, state, owner), save running ones of its kind or owner."""
        kinds, owners = ("edit_head", "evaluate_sample_set"), ("monitoring", "analyst", None)
        others = [(kind, state, owner) for kind in kinds for state in (RUNNING, "succeeded", "failed") for owner in owners
                  if not (state == RUNNING and (kind == "edit_head" or owner == "monitoring"))]
        store, time = SQLiteStore(path), 0.0
        for i in range(12):
            store.insert_job(JobRecord(f"edit-{i:02d}", "edit_head", RUNNING, time, owner="monitoring"))
            for j in range(between if i < 11 else 0):
                time += 1
                kind, state, owner = others[j % len(others)]
                store.insert_job(JobRecord(f"other-{i:02d}-{j:03d}", kind, state, time, owner=owner))
            time += 1
        return store

    few, many = store_with(tmp_path / "few", 10), store_with(tmp_path / "many", 400)

    def pages(store: SQLiteStore) -> dict[str, Callable[[], object]]:
        calls = {}
        for kind in ("", "edit_head"):
            for owner in ("", "monitoring"):
                first = store.list_jobs(kind=kind, state=RUNNING, owner=owner, limit=5)
                assert {(job.state, job.kind if kind else kind, job.owner if owner else owner) for job in first} == {(RUNNING, kind, owner)}
                after = (first[-1].create_time, first[-1].job_id)
                calls[f"first page, kind={kind!r} owner={owner!r}"] = lambda kind=kind, owner=owner: store.list_jobs(
                    kind=kind, state=RUNNING, owner=owner, limit=5)
                calls[f"next page, kind={kind!r} owner={owner!r}"] = lambda kind=kind, owner=owner, after=after: store.list_jobs(
                    kind=kind, state=RUNNING, owner=owner, after=after, limit=5)
        return calls

    few_pages, many_pages = pages(few), pages(many)
    for name, call in few_pages.items():
        few_steps, many_steps = vm_steps(few, call), vm_steps(many, many_pages[name])
        assert many_steps < 1.2 * few_steps, (name, few_steps, many_steps)
    for store in (few, many):
        store.close()


def test_operations_by_state_owner_and_kind_page_as_filtering_all_would_as_their_states_change(tmp_path):
    """An owner's jobs by state are read from a copy of each state in job_owners, which
    triggers keep: every filter's pages list what filtering every job lists, also after
    jobs change state (by update_job, and at start-up's failing of unfinished ones)."""
    import dataclasses
    import itertools
    import random

    from explaind.store import FAILED, QUEUED, RUNNING, SUCCEEDED, JobRecord, SQLiteStore

    rng = random.Random(7)
    kinds, states, owners = ("edit_head", "evaluate_sample_set"), (QUEUED, RUNNING, SUCCEEDED, FAILED), ("monitoring", "analyst")
    store = SQLiteStore(tmp_path)
    jobs = {}
    for i in range(80):  # times from 20 values: ties, ordered by id
        job = JobRecord(f"job-{i:02d}", rng.choice(kinds), rng.choice(states), float(rng.randrange(20)), owner=rng.choice((*owners, None)))
        store.insert_job(job)
        jobs[job.job_id] = job

    def assert_pages_filter_every_job() -> None:
        for kind, state, owner in itertools.product(("", *kinds), ("", *states), ("", *owners)):
            listed: list[str] = []
            after = None
            while page := store.list_jobs(kind=kind, state=state, owner=owner, after=after, limit=7):
                listed += [job.job_id for job in page]
                after = (page[-1].create_time, page[-1].job_id)
            assert listed == [job.job_id for job in sorted(jobs.values(), key=lambda job: (-job.create_time, job.job_id))
                              if kind in ("", job.kind) and state in ("", job.state) and owner in ("", job.owner)], (kind, state, owner)

    assert_pages_filter_every_job()
    for job_id in rng.sample(sorted(jobs), 40):
        jobs[job_id] = dataclasses.replace(jobs[job_id], state=rng.choice(states), step=1)
        store.update_job(jobs[job_id])
    assert_pages_filter_every_job()
    for job_id, _ in store.fail_unfinished_jobs("restart"):
        jobs[job_id] = dataclasses.replace(jobs[job_id], state=FAILED)
    assert_pages_filter_every_job()
    store.close()


def test_the_cli_lists_one_owners_operations_and_sets(tmp_path, classifier_dir, callers_file, capsys):
    import json

    from explaind.client.cli import main

    server = start(tmp_path, classifier_dir, callers_file=str(callers_file))
    try:
        with client(server, "tokenMON") as monitoring, client(server, "tokenANA") as analyst:
            monitoring.create_sample_set([IMAGE] * 2, [0, 1], sample_set_id="mine")
            analyst.create_sample_set([IMAGE] * 2, [0, 1], sample_set_id="theirs")
            operation = analyst.evaluate_sample_set("mine")
            operation.result(timeout=60)
        target = ["--target", f"127.0.0.1:{server.port}", "--token", "tokenMON"]
        capsys.readouterr()
        assert main([*target, "sample-set", "list", "--owner", "analyst", "--json"]) == 0
        assert [s["sample_set_id"] for s in json.loads(capsys.readouterr().out)] == ["theirs"]
        assert main([*target, "operations", "list", "--owner", "analyst"]) == 0
        assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [operation.name]
        assert main([*target, "operations", "list", "--owner", "monitoring"]) == 0
        assert capsys.readouterr().err == "no operations of monitoring\n"
        assert main([*target, "sample-set", "list", "--owner", "root"]) == 0
        assert capsys.readouterr().err == "no sample sets of root\n"
        assert main([*target, "operations", "list", "--owner", "Not A Name"]) != 0
        assert "owner" in capsys.readouterr().err
    finally:
        server.stop(0)

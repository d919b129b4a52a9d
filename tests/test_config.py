"""explaind.config's checks, key by key: each range's edge accepted and the value past it
refused naming its key, so a bad file stops the start and a good one is never refused."""

from __future__ import annotations

import datetime
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from conftest import write_config
from explaind.config import WORLD_CLIP_ILLUSION_EPSILON, ConfigError, ServerSection, default_config, ignored_keys, load_config, parse_callers, unusable_model_path

# Listed here, not taken from explaind.config: a key dropped from a range there must fail a test.
NOT_NEGATIVE = [
    "server.port", "server.metrics_port", "server.health_port", "server.grace_period_s", "server.data_dir_reserve_bytes",
    "server.upload_idle_timeout_s", "server.max_samples_per_caller", "server.max_concurrent_rpcs", "batching.max_queue_delay_ms",
    "batching.max_queued_images_per_caller", "runtime.num_threads", "classifier.image_size", "classifier.resize_size",
    "jobs.retention_days", "jobs.max_run_seconds", "jobs.max_queued_per_caller", "clip.illusion_epsilon", "tracing.sample_ratio",
    "server.max_head_versions_per_caller",
]
AT_LEAST_ONE = [
    "server.max_message_bytes", "server.max_pixels_per_request", "server.max_decode_bytes", "batching.max_batch_size",
    "batching.max_queue_size", "batching.max_images_per_request", "jobs.max_queued", "jobs.gpu_workers", "jobs.evaluate_batch_size",
]
# A stream or wait may hold half the gRPC threads, and one at least: with one thread it held them all.
AT_LEAST_TWO = ["server.max_workers"]
# Sent as int32 (RequestLimits) or passed to gRPC or torch as a C int.
C_INT = [
    "server.max_message_bytes", "server.max_concurrent_rpcs", "server.max_samples_per_caller", "runtime.num_threads",
    "batching.max_batch_size", "batching.max_queue_size", "batching.max_images_per_request", "batching.max_queued_images_per_caller",
    "server.max_head_versions_per_caller",
]
PORTS = ["port", "metrics_port", "health_port"]
# A thread each: 1e9 started a server that took calls until threads or memory ran out.
THREAD_POOLS = ["server.max_workers", "jobs.gpu_workers"]
# Durations where TOML's inf reads as "never", as their 0 does (docs/configuration.md).
INF_IS_NEVER = ["server.upload_idle_timeout_s", "jobs.retention_days", "jobs.max_run_seconds"]


def config_with(tmp_path, classifier_dir, key: str, value: object, **more: object):
    section, _, name = key.partition(".")
    return load_config(write_config(tmp_path / "c.toml", classifier_dir, **{section: {name: value, **more}}))


@pytest.mark.parametrize("key", NOT_NEGATIVE)
def test_keys_where_0_means_something_take_0_and_refuse_below_it(tmp_path, classifier_dir, key):
    section, _, name = key.partition(".")
    assert getattr(getattr(config_with(tmp_path, classifier_dir, key, 0), section), name) == 0
    with pytest.raises(ConfigError, match=rf"c.toml: \[{section}\]\.{name} must be at least 0, got -1"):
        config_with(tmp_path, classifier_dir, key, -1)


@pytest.mark.parametrize("key", NOT_NEGATIVE + AT_LEAST_ONE + AT_LEAST_TWO)
def test_only_the_never_ending_durations_take_inf(tmp_path, classifier_dir, key):
    # An integer key, or one with an upper bound, given inf must stop the start by name,
    # not overflow a timer or a C int later.
    section, _, name = key.partition(".")
    if key in INF_IS_NEVER:
        assert getattr(getattr(config_with(tmp_path, classifier_dir, key, float("inf")), section), name) == float("inf")
    else:
        with pytest.raises(ConfigError, match=rf"c.toml: \[{section}\]\.{name} must be (an integer|at most [0-9.]+), got inf"):
            config_with(tmp_path, classifier_dir, key, float("inf"))


@pytest.mark.parametrize("key", AT_LEAST_ONE)
def test_sizes_and_counts_take_1_and_refuse_0(tmp_path, classifier_dir, key):
    section, _, name = key.partition(".")
    # 1 image a request and 1 queued: max_queue_size may not be below max_images_per_request.
    fitted = {"max_images_per_request": 1} if key == "batching.max_queue_size" else {}
    assert getattr(getattr(config_with(tmp_path, classifier_dir, key, 1, **fitted), section), name) == 1
    with pytest.raises(ConfigError, match=rf"c.toml: \[{section}\]\.{name} must be at least 1, got 0"):
        config_with(tmp_path, classifier_dir, key, 0)


@pytest.mark.parametrize("key", AT_LEAST_TWO)
def test_thread_pools_that_streams_hold_half_of_take_2_and_refuse_1(tmp_path, classifier_dir, key):
    # With one gRPC thread, one health Watch (which needs no token) left none for any other call.
    section, _, name = key.partition(".")
    assert getattr(getattr(config_with(tmp_path, classifier_dir, key, 2), section), name) == 2
    with pytest.raises(ConfigError, match=rf"c.toml: \[{section}\]\.{name} must be at least 2, got 1"):
        config_with(tmp_path, classifier_dir, key, 1)


@pytest.mark.parametrize("key", C_INT)
def test_values_passed_on_as_a_c_int_take_its_largest_and_refuse_one_more(tmp_path, classifier_dir, key):
    section, _, name = key.partition(".")
    big = {"max_queue_size": 2**31 - 1} if key == "batching.max_images_per_request" else {}
    assert getattr(getattr(config_with(tmp_path, classifier_dir, key, 2**31 - 1, **big), section), name) == 2**31 - 1
    with pytest.raises(ConfigError, match=rf"c.toml: \[{section}\]\.{name} must be at most 2147483647, got 2147483648"):
        config_with(tmp_path, classifier_dir, key, 2**31, **big)


@pytest.mark.parametrize("key", THREAD_POOLS)
def test_thread_pools_take_4096_threads_and_refuse_one_more(tmp_path, classifier_dir, key):
    section, _, name = key.partition(".")
    assert getattr(getattr(config_with(tmp_path, classifier_dir, key, 4096), section), name) == 4096
    for refused in (4097, 10**9):
        with pytest.raises(ConfigError, match=rf"c.toml: \[{section}\]\.{name} must be at most 4096, got {refused}"):
            config_with(tmp_path, classifier_dir, key, refused)


def test_a_reserve_of_any_size_is_taken(tmp_path, classifier_dir):
    # A large volume's deletes may need more than 1 GiB (a cap there refused it), and one
    # larger than half the free space is not set aside (the log says so), refusing nothing.
    for reserve in (2**30 + 1, 2**40, 2**63 - 1):
        assert config_with(tmp_path, classifier_dir, "server.data_dir_reserve_bytes", reserve).server.data_dir_reserve_bytes == reserve


@pytest.mark.parametrize("key", ["classifier.image_size", "classifier.resize_size"])
def test_input_sizes_take_the_largest_image_side_and_refuse_one_more(tmp_path, classifier_dir, key):
    # 1e9 failed the start in the model's probe allocation; 20000 took 9.6 GB there and 4.8 GB per Predict image.
    _, _, name = key.partition(".")
    assert getattr(config_with(tmp_path, classifier_dir, key, 4096).classifier, name) == 4096
    for refused in (4097, 10**9):
        with pytest.raises(ConfigError, match=rf"c.toml: \[classifier\]\.{name} must be at most 4096, got {refused}$"):
            config_with(tmp_path, classifier_dir, key, refused)


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("server.grace_period_s", 10**400 - 1, r"must be at most 86400.0, got inf$"),
    ("server.grace_period_s", 1 - 10**400, r"must be at least 0, got -inf$"),  # not "at most": it is below
    ("server.upload_idle_timeout_s", 1 - 10**400, r"must be at least 0, got -inf$"),
], ids=["above", "below", "below-unbounded-key"])
def test_an_integer_no_float_holds_is_refused_by_name(tmp_path, classifier_dir, key, value, problem):
    # Python's TOML reader takes integers of any size: float() of one was an OverflowError traceback.
    section, _, name = key.partition(".")
    with pytest.raises(ConfigError, match=rf"c.toml: \[{section}\]\.{name} {problem}"):
        config_with(tmp_path, classifier_dir, key, value)


def test_an_integer_no_float_holds_reads_as_toml_s_infinite_float_where_a_key_takes_it(tmp_path, classifier_dir):
    # As upload_idle_timeout_s = 1e400 (inf: never) is taken, so is the integer 10**400.
    assert config_with(tmp_path, classifier_dir, "server.upload_idle_timeout_s", 10**400).server.upload_idle_timeout_s == math.inf


@pytest.mark.parametrize("name", PORTS)
def test_each_port_takes_65535_and_refuses_65536(tmp_path, classifier_dir, name):
    assert getattr(config_with(tmp_path, classifier_dir, f"server.{name}", 65535).server, name) == 65535
    with pytest.raises(ConfigError, match=rf"\[server\]\.{name} must be at most 65535, got 65536"):
        config_with(tmp_path, classifier_dir, f"server.{name}", 65536)


def test_max_concurrent_rpcs_may_equal_max_workers_and_0_is_4_per_worker(tmp_path, classifier_dir):
    config = config_with(tmp_path, classifier_dir, "server.max_concurrent_rpcs", 8, max_workers=8)
    assert config.server.concurrent_rpcs == 8
    with pytest.raises(ConfigError, match=r"\[server\]\.max_concurrent_rpcs \(7\) must be at least \[server\]\.max_workers \(8\)"):
        config_with(tmp_path, classifier_dir, "server.max_concurrent_rpcs", 7, max_workers=8)
    assert default_config().replace("server", max_workers=3).server.concurrent_rpcs == 12


@pytest.mark.parametrize(("key", "value", "error"), [
    # Types and values in an operator's words, TOML's: "must be a str, got True" was Python's.
    ("server.port", True, r"\[server\]\.port must be a number, got true$"),  # TOML's true is no port 1
    ("server.host", 5, r"\[server\]\.host must be a string, got 5$"),
    ("server.host", True, r"\[server\]\.host must be a string, got true$"),  # no address: .strip() of it was a traceback
    ("server.host", datetime.date(2024, 1, 1), r"\[server\]\.host must be a string, got 2024-01-01$"),
    ("classifier.factory_kwargs", [1], r"\[classifier\]\.factory_kwargs must be a table, got \[1\]$"),
    ("classifier.class_names", "cat", r"\[classifier\]\.class_names must be a list, got 'cat'$"),
    ("classifier.class_names", {"a": True}, r"\[classifier\]\.class_names must be a list, got \{a = true\}$"),
    ("classifier.mean", [True, True, True], r"\[classifier\]\.mean must be a list of numbers, got \[true, true, true\]$"),
    ("server.host", "  ", r"\[server\]\.host must be an address to listen on .* got '  '"),
    # With its port: gRPC's bind failure blamed "another server using the port" on "[0.0.0.0:50051]:50051".
    ("server.host", "0.0.0.0:50051", r"\[server\]\.host must be an address without a port \(that is \[server\]\.port\), got '0.0.0.0:50051'$"),
    ("server.host", "[::1]:50051", r"\[server\]\.host must be an address without a port \(that is \[server\]\.port\), got '\[::1\]:50051'$"),
    # Brackets half written, or around no IPv6 address: gRPC's bind failure blamed the port on "[::1:50051".
    ("server.host", "[::1", r"\[server\]\.host takes brackets around a whole IPv6 address alone \(\[::1\]\), got '\[::1'$"),
    ("server.host", "::1]", r"\[server\]\.host takes brackets around a whole IPv6 address alone \(\[::1\]\), got '::1\]'$"),
    ("server.host", "[127.0.0.1]", r"\[server\]\.host takes brackets around a whole IPv6 address alone \(\[::1\]\), got '\[127.0.0.1\]'$"),
    ("server.log_format", "xml", r"\[server\]\.log_format must be one of 'text' or 'json', got 'xml'$"),
    ("server.token", "a b", r"\[server\]\.token holds a character other than printable ASCII"),
    ("runtime.backend", "tvm", r"\[runtime\]\.backend must be one of 'eager', 'compile', 'onnxruntime' or 'tensorrt', got 'tvm'$"),
    ("classifier.loader", "keras", r"\[classifier\]\.loader must be one of .* got 'keras'"),
    ("classifier.mean", [0.5, 0.5], r"\[classifier\]\.mean and \.std must have the same length"),
    ("tracing.otlp_endpoint", "http://:4317", r"\[tracing\]\.otlp_endpoint .*: no host$"),
    ("tracing.otlp_endpoint", "http://collector:4317?x=1", r"\[tracing\]\.otlp_endpoint .*: a path, which gRPC has no use for$"),
    ("tracing.otlp_endpoint", "http://collector:4317#x", r"\[tracing\]\.otlp_endpoint .*: a path, which gRPC has no use for$"),
    ("tracing.otlp_endpoint", "//collector:4317", r"\[tracing\]\.otlp_endpoint .*: the scheme must be http or https$"),
    ("tracing.otlp_endpoint", "http://collector:port", r"\[tracing\]\.otlp_endpoint .*: Port could not be cast"),
])
def test_values_of_the_wrong_kind_are_refused_naming_the_key(tmp_path, classifier_dir, key, value, error):
    with pytest.raises(ConfigError, match=r"c.toml: " + error):
        config_with(tmp_path, classifier_dir, key, value)


@pytest.mark.parametrize("host", ["::", "[::]", "::1", "[::1]", "::ffff:127.0.0.1", "fe80::1%eth0", "[fe80::1%eth0]", "explaind.internal"])
def test_ipv6_hosts_with_or_without_brackets_and_host_names_are_addresses_to_listen_on(tmp_path, classifier_dir, host):
    assert config_with(tmp_path, classifier_dir, "server.host", host).server.host == host


@pytest.mark.parametrize(("name", "bad"), [("mean", float("nan")), ("mean", float("inf")), ("mean", -float("inf")), ("std", float("inf"))])
def test_a_normalisation_that_is_not_finite_is_refused_naming_its_key(tmp_path, classifier_dir, name, bad):
    # (pixels - mean) / std with a NaN or an infinity in either makes every input, and so every prediction, NaN or 0.
    normalisation = {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}
    assert load_config(write_config(tmp_path / "c.toml", classifier_dir, classifier=normalisation)).classifier.std == (0.2, 0.2, 0.2)
    normalisation[name] = [bad, 0.5, 0.5]
    with pytest.raises(ConfigError, match=rf"c.toml: \[classifier\]\.{name} must hold finite numbers, got \[{bad}, 0.5, 0.5\]"):
        load_config(write_config(tmp_path / "c.toml", classifier_dir, classifier=normalisation))


def test_a_normalisation_for_0_255_pixels_or_another_channel_count_is_refused_saying_what_to_give(tmp_path, classifier_dir):
    # mmcv's and OpenCV pipelines' mean = [123.675, 116.28, 103.53] (std [58.395, 57.12, 57.375]) was
    # served as given, on pixels in [0, 1]: every image reached the model about alike, and got one prediction.
    normalisation = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
    with pytest.raises(ConfigError, match=re.escape("c.toml: [classifier].mean holds values above 1, got [123.675, 116.28, 103.53], "
                                                    "but images reach the model with pixels in [0, 1]: give mean and std on that scale")):
        load_config(write_config(tmp_path / "c.toml", classifier_dir, classifier=normalisation))
    # Images are RGB: 3 values, or 1 for every channel; 2 failed at load with torch's broadcasting error, naming no key.
    with pytest.raises(ConfigError, match=re.escape("c.toml: [classifier].mean and .std must hold one value per channel of RGB images (3), "
                                                    "or one for all, got 2")):
        load_config(write_config(tmp_path / "c.toml", classifier_dir, classifier={"mean": [0.5, 0.5], "std": [0.2, 0.2]}))
    assert load_config(write_config(tmp_path / "c.toml", classifier_dir, classifier={"mean": [0.5], "std": [0.2]})).classifier.std == (0.2,)
    # 1 itself is a mean [0, 1] pixels can have (all white).
    normalisation = {"mean": [1, 0.5, 0], "std": [0.5, 0.5, 0.5]}
    assert load_config(write_config(tmp_path / "c.toml", classifier_dir, classifier=normalisation)).classifier.mean == (1, 0.5, 0)


def test_sections_that_are_unknown_or_no_table_and_settings_that_exclude_each_other_are_refused(tmp_path, classifier_dir):
    (tmp_path / "c.toml").write_text('[serve]\nport = 1\n')
    with pytest.raises(ConfigError, match=r"c.toml: unknown section\(s\) \['serve'\]"):
        load_config(tmp_path / "c.toml")
    (tmp_path / "c.toml").write_text('server = 5\n')
    with pytest.raises(ConfigError, match=r"c.toml: \[server\] must be a table"):
        load_config(tmp_path / "c.toml")
    with pytest.raises(ConfigError, match=r"\[server\]\.data_dir must name a directory, got ' '"):  # `--data-dir " "`
        default_config().replace("server", data_dir=" ")
    with pytest.raises(ConfigError, match=r"set one of \[server\]\.token and \[server\]\.token_file, not both"):
        config_with(tmp_path, classifier_dir, "server.token", "tokenONE", token_file="token")
    with pytest.raises(ConfigError, match=r"set \[clip\]\.path \(an open_clip directory\) or \[clip\]\.model and \.checkpoint, not both"):
        config_with(tmp_path, classifier_dir, "clip.path", "clip", checkpoint="clip.safetensors")
    assert config_with(tmp_path, classifier_dir, "batching.max_images_per_request", 64, max_queue_size=64).batching.max_queue_size == 64
    with pytest.raises(ConfigError, match=r"\[batching\]\.max_images_per_request \(65\) must not exceed \[batching\]\.max_queue_size \(64\)"):
        config_with(tmp_path, classifier_dir, "batching.max_images_per_request", 65, max_queue_size=64)
    with pytest.raises(ConfigError, match=r"\[server\]\.admins names callers of \[server\]\.callers_file; set that too"):
        config_with(tmp_path, classifier_dir, "server.admins", ["root"])
    with pytest.raises(ConfigError, match=r"\[server\]\.admins: 'Root' is no caller name"):
        config_with(tmp_path, classifier_dir, "server.admins", ["Root"], callers_file="callers")
    with pytest.raises(ConfigError, match=rf"\[server\]\.admins: '{'R' * 64}' is no caller name"):  # a refusal quotes 64 characters at most
        config_with(tmp_path, classifier_dir, "server.admins", ["R" * 5000], callers_file="callers")


@pytest.mark.parametrize(("text", "error"), [
    ("[server]\nprot = 5\n", "unknown key(s) ['prot'] in [server] ('prot': did you mean 'port'?); expected ['admins', "),
    ("[server]\nmax_worker = 5\nPort = 1\n", "unknown key(s) ['Port', 'max_worker'] in [server] "
                                              "('Port': did you mean 'port'?; 'max_worker': did you mean 'max_workers'?); expected"),
    ('[server]\ndevice = "cuda"\n', "unknown key(s) ['device'] in [server] ('device' is a key of [runtime]); expected"),
    ('[server]\npath = "m"\n', "unknown key(s) ['path'] in [server] ('path' is a key of [classifier], [clip], [diffusion]); expected"),
    ("[diffusion]\nxyzzy = 1\n", "unknown key(s) ['xyzzy'] in [diffusion]; expected ['path']"),
    ("port = 5\n", "unknown section(s) ['port'] ('port' is a key of [server]); expected ['batching', "),
    ("[sever]\nport = 5\n", "unknown section(s) ['sever'] ('sever': did you mean [server]?); expected"),
    ("[xyzzy]\n", "unknown section(s) ['xyzzy']; expected ['batching', "),
])
def test_an_unknown_key_or_section_is_refused_with_the_one_it_is_likely_a_typo_of_or_the_section_it_belongs_in(tmp_path, text, error):
    # A 28-key list to scan for the typo, and not a word that [server] device was [runtime]'s.
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(tmp_path / "c.toml")
    assert str(refused.value).startswith(f"{tmp_path / 'c.toml'}: {error}")


def test_a_clip_model_without_its_checkpoint_stops_the_start_as_the_config_is_read(tmp_path, classifier_dir):
    # As a checkpoint without its model does: found only as the models loaded, after the file was taken.
    with pytest.raises(ConfigError, match=r"c.toml: \[clip\]\.model needs \[clip\]\.checkpoint, its weights \(a file, or an open_clip "
                                          r"pretrained tag such as \"openai\"\)"):
        config_with(tmp_path, classifier_dir, "clip.model", "RN50")
    assert config_with(tmp_path, classifier_dir, "clip.model", "RN50", checkpoint="openai").clip.checkpoint == "openai"


# The keys of [classifier] each loader leaves unused (engine/models.py), listed here: a key
# a loader is wrongly said to read, or not to, must fail a test.
LOADER_IGNORES = {
    "world": ["name", "weights", "factory", "factory_kwargs"],
    "torchvision": ["path", "factory", "factory_kwargs"],
    "export": ["name", "weights", "factory", "factory_kwargs"],
    "torchscript": ["name", "weights", "factory", "factory_kwargs", "feature_layer", "head"],
    "onnx": ["name", "weights", "factory", "factory_kwargs", "feature_layer", "head"],
    "factory": ["path", "name"],
}


@pytest.mark.parametrize("loader", sorted(LOADER_IGNORES))
def test_the_classifier_keys_a_loader_leaves_unused_are_warned_of_by_name(tmp_path, classifier_dir, loader):
    # A path beside loader "torchvision" was ignored without a word: its reader believed it served that file.
    every_key = {"loader": loader, "name": "resnet18", "weights": "w.pth", "factory": "tiny_net:build", "factory_kwargs": {"width": 4},
                 "feature_layer": "layer3", "head": "fc", "class_names": ["a", "b"], "image_size": 64, "resize_size": 72,
                 "interpolation": "bicubic", "jpeg_reduced_decode": True, "mean": [0.5], "std": [0.25]}
    config = load_config(write_config(tmp_path / "c.toml", classifier_dir, classifier=every_key))
    ignored = [f"[classifier].{key}" for key in LOADER_IGNORES[loader]]
    warnings = ignored_keys(config)
    assert [warning.partition(" (its own keys: ")[0] for warning in warnings] == [
        f"{tmp_path / 'c.toml'}: {', '.join(ignored[:-1])} and {ignored[-1]} are ignored by loader {loader!r}"]


def test_only_keys_the_file_sets_to_other_than_their_default_are_warned_of(tmp_path, classifier_dir):
    assert ignored_keys(load_config(write_config(tmp_path / "c.toml", classifier_dir))) == []
    one = load_config(write_config(tmp_path / "c.toml", classifier_dir, classifier={"loader": "onnx", "name": "resnet18", "weights": ""}))
    assert ignored_keys(one) == [f"{tmp_path / 'c.toml'}: [classifier].name is ignored by loader 'onnx' (its own keys: path)"]
    # The world's path, which the defaults put in, is no key of the file.
    assert ignored_keys(default_config().replace("classifier", loader="torchvision", name="resnet18", weights="DEFAULT")) == []


@pytest.mark.parametrize(("sections", "warning", "with_what_they_need"), [
    ({"classifier": {"class_names": ["a", "b"], "class_names_file": "names.txt"}},
     "[classifier].class_names_file is ignored while [classifier].class_names is set, which wins", {"classifier": {"class_names": []}}),
    ({"clip": {"illusion_epsilon": 0.5}}, "[clip].illusion_epsilon is ignored without a CLIP ([clip].path, or .model and .checkpoint), "
     "which CLIP-Illusion needs", {"clip": {"model": "ViT-B-32", "checkpoint": "openai"}}),
    ({"tracing": {"service_name": "inspector", "sample_ratio": 0.5}}, "[tracing].service_name and [tracing].sample_ratio are ignored "
     "without [tracing].otlp_endpoint: nothing is traced", {"tracing": {"otlp_endpoint": "http://collector:4317"}}),
    ({"server": {"max_samples_per_caller": 10, "max_head_versions_per_caller": 20}, "batching": {"max_queued_images_per_caller": 10},
      "jobs": {"max_queued_per_caller": 2}},
     "[server].max_samples_per_caller, [server].max_head_versions_per_caller, [batching].max_queued_images_per_caller and "
     "[jobs].max_queued_per_caller are ignored without "
     "[server].callers_file: per-caller limits bound named callers, and no call has one", {"server": {"callers_file": "callers"}}),
])
def test_keys_another_key_leaves_unused_are_warned_of_until_it_is_set(tmp_path, classifier_dir, sections, warning, with_what_they_need):
    config = load_config(write_config(tmp_path / "c.toml", classifier_dir, **sections))
    assert ignored_keys(config) == [f"{tmp_path / 'c.toml'}: {warning}"]
    for name, values in with_what_they_need.items():
        sections[name] = {**sections.get(name, {}), **values}
    assert ignored_keys(load_config(write_config(tmp_path / "c.toml", classifier_dir, **sections))) == []


def test_a_model_path_the_loader_does_not_read_is_not_checked_before_the_bind(tmp_path, classifier_dir):
    # A class_names_file beside class_names is unread (a warning, above): refusing it as
    # missing stopped a server that had started with the warning.
    names = {"class_names": ["a", "b", "c", "d"], "class_names_file": "absent.txt"}
    assert unusable_model_path(load_config(write_config(tmp_path / "c.toml", classifier_dir, classifier=names))) is None
    assert unusable_model_path(load_config(write_config(tmp_path / "c.toml", classifier_dir, classifier={"class_names_file": "absent.txt"}))) == (
        f"[classifier].class_names_file not found: {tmp_path / 'absent.txt'}")
    # Weights by name are downloaded, not read from a path.
    by_name = {"classifier": {"loader": "torchvision", "name": "resnet18", "weights": "ResNet18_Weights.IMAGENET1K_V1"},
               "clip": {"model": "ViT-B-32", "checkpoint": "laion2b_s34b_b79k"}}
    assert unusable_model_path(load_config(write_config(tmp_path / "c.toml", classifier_dir, **by_name))) is None


def _diffusers_directory(directory: Path, _classifier_dir: Path) -> None:
    """A diffusers pipeline's files as the pre-bind check reads them (no weights in them)."""
    directory.mkdir()
    (directory / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                                                            "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None]}))
    for part, files in (("unet", ("config.json", "diffusion_pytorch_model.safetensors")), ("scheduler", ("scheduler_config.json",))):
        (directory / part).mkdir()
        for file in files:
            (directory / part / file).write_text("{}")


def _open_clip_directory(directory: Path, _classifier_dir: Path) -> None:
    directory.mkdir()
    (directory / "open_clip_config.json").write_text("{}")
    (directory / "open_clip_model.safetensors").write_text("")


def _world_t2i_directory(directory: Path, classifier_dir: Path) -> None:
    _diffusers_directory(directory, classifier_dir)
    (directory / "model_index.json").unlink()
    (directory / "vae").mkdir()
    (directory / "vae" / "config.json").write_text("{}")


def _sharded_unet(directory: Path) -> None:
    """The unet's weights as a safetensors index and the shards it names, as diffusers saves large ones."""
    (directory / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shards = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    (directory / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": dict(zip("ab", shards))}))
    for shard in shards:
        (directory / "unet" / shard).write_text("")


# A readable directory passed the check whatever it held: a file the loader reads missing inside it failed after "listening on".
@pytest.mark.parametrize(("section", "make", "break_it", "message"), [
    ("diffusion", _diffusers_directory, lambda d: shutil.rmtree(d / "unet"), "[diffusion].path: not found: {d}/unet"),
    ("diffusion", _diffusers_directory, lambda d: ((d / "unet" / "config.json").unlink(), (d / "unet" / "config.json").symlink_to(d / "gone")),
     "[diffusion].path: not found: {d}/unet/config.json"),
    # A file where model_index.json names a component folder: listing it raised NotADirectoryError: "error: [Errno 20] Not a directory", no key.
    ("diffusion", _diffusers_directory, lambda d: (shutil.rmtree(d / "unet"), (d / "unet").write_text("{}")), "[diffusion].path: not a directory: {d}/unet"),
    ("diffusion", _diffusers_directory, lambda d: (d / "model_index.json").write_text("{"), "[diffusion].path: {d}/model_index.json is not JSON: "),
    ("diffusion", _world_t2i_directory, lambda d: shutil.rmtree(d / "scheduler"),
     "[diffusion].path: not found: {d}/model_index.json (nor scheduler/; it has vae/, unet/)"),
    # A file a component's loader opens, left out by a partial copy: found only as the models loaded, after "listening on".
    ("diffusion", _diffusers_directory, lambda d: (d / "unet" / "config.json").unlink(), "[diffusion].path: not found: {d}/unet/config.json"),
    ("diffusion", _diffusers_directory, lambda d: (d / "scheduler" / "scheduler_config.json").unlink(),
     "[diffusion].path: not found: {d}/scheduler/scheduler_config.json"),
    ("diffusion", _world_t2i_directory, lambda d: (d / "unet" / "diffusion_pytorch_model.safetensors").unlink(),
     "[diffusion].path: not found: {d}/unet/diffusion_pytorch_model.safetensors"),
    ("diffusion", _world_t2i_directory, lambda d: (d / "vae" / "config.json").unlink(), "[diffusion].path: not found: {d}/vae/config.json"),
    ("diffusion", lambda d, classifier_dir: (_world_t2i_directory(d, classifier_dir), _sharded_unet(d)),
     lambda d: (d / "unet" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink(),
     "[diffusion].path: not found: {d}/unet/diffusion_pytorch_model-00002-of-00002.safetensors"),
    ("clip", _open_clip_directory, lambda d: (d / "open_clip_model.safetensors").unlink(), "[clip].path {d} has no weights file"),
    ("clip", _open_clip_directory, lambda d: ((d / "open_clip_model.safetensors").unlink(), (d / "open_clip_model.safetensors").symlink_to(d / "gone")),
     "[clip].path: not found: {d}/open_clip_model.safetensors"),
    ("clip", _open_clip_directory, lambda d: (d / "open_clip_config.json").unlink(), "[clip].path {d} is not a directory holding open_clip_config.json"),
    ("classifier", lambda d, classifier_dir: shutil.copytree(classifier_dir, d), lambda d: (d / "model.safetensors").unlink(),
     "[classifier].path: not found: {d}/model.safetensors"),
])
def test_a_model_directory_missing_a_file_its_loader_reads_is_refused_before_the_bind(tmp_path, classifier_dir, section, make, break_it, message):
    directory = tmp_path / "model"
    make(directory, classifier_dir)
    config = write_config(tmp_path / "c.toml", classifier_dir, **{section: {"path": str(directory)}})
    assert unusable_model_path(load_config(config)) is None
    break_it(directory)
    problem = unusable_model_path(load_config(config))
    assert problem is not None and problem.startswith(message.format(d=directory)), problem


def test_a_file_no_loader_opens_in_a_model_directory_does_not_stop_the_start(tmp_path, classifier_dir):
    # Every file in a component folder, and every CLIP weights file, was checked: a stray one
    # not found (here a dangling link) or unreadable stopped a start whose models load.
    from explaind.engine.models import load_clip, load_diffusion
    from explaind.world.assets import clip_dir, t2i_dir

    shutil.copytree(t2i_dir(), tmp_path / "t2i")
    shutil.copytree(clip_dir(), tmp_path / "clip")
    for stray in ("t2i/unet/notes.txt", "t2i/unet/diffusion_pytorch_model.fp16.safetensors", "t2i/vae/diffusion_pytorch_model.bin",
                  "t2i/scheduler/config.json", "clip/old_weights.bin"):
        (tmp_path / stray).symlink_to(tmp_path / "gone")
    config = load_config(write_config(tmp_path / "c.toml", classifier_dir, clip={"path": str(tmp_path / "clip")},
                                      diffusion={"path": str(tmp_path / "t2i")}))
    assert unusable_model_path(config) is None
    load_diffusion(config.diffusion, load_clip(config.clip, required=True), required=True)  # raises where it cannot load


@pytest.mark.parametrize("index", ["[]", "{}", '{"weight_map": ["a.safetensors"]}', '{"weight_map": {"a": 1}}'])
def test_a_sharded_weights_index_of_the_wrong_shape_is_left_to_the_loader_not_a_traceback_before_the_bind(tmp_path, classifier_dir, index):
    # JSON, but not an index naming its shards: the check looks at the index alone, and loading says what is wrong with it.
    _world_t2i_directory(tmp_path / "t2i", classifier_dir)
    _sharded_unet(tmp_path / "t2i")
    (tmp_path / "t2i" / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(index)
    assert unusable_model_path(load_config(write_config(tmp_path / "c.toml", classifier_dir, diffusion={"path": str(tmp_path / "t2i")}))) is None


@pytest.mark.parametrize("save", [{"safe_serialization": False}, {"max_shard_size": "2MB"}], ids=["bin", "sharded"])
def test_a_unet_saved_as_diffusers_also_loads_it_passes_the_check(tmp_path, classifier_dir, save):
    # The check takes the weights diffusers' from_pretrained does (no variant): a sharded
    # safetensors index with its shards, else diffusion_pytorch_model.safetensors, else .bin.
    from diffusers import UNet2DConditionModel

    from explaind.world.assets import t2i_dir

    shutil.copytree(t2i_dir(), tmp_path / "t2i")
    shutil.rmtree(tmp_path / "t2i" / "unet")
    UNet2DConditionModel.from_pretrained(t2i_dir() / "unet").save_pretrained(tmp_path / "t2i" / "unet", **save)
    assert not (tmp_path / "t2i" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    UNet2DConditionModel.from_pretrained(tmp_path / "t2i" / "unet")
    config = write_config(tmp_path / "c.toml", classifier_dir, diffusion={"path": str(tmp_path / "t2i")})
    assert unusable_model_path(load_config(config)) is None


@pytest.mark.parametrize(("class_name", "checked"), [
    # Stable Diffusion 1.x / 2.x / XL, Kandinsky 2.2's decoder: a UNet and an autoencoder; SD3's, Flux's, PixArt's transformer.
    ("UNet2DConditionModel", True), ("AutoencoderKL", True), ("SD3Transformer2DModel", True), ("FluxTransformer2DModel", True),
    ("PixArtTransformer2DModel", True), ("Transformer2DModel", True), ("ControlNetModel", True),
    ("WanTransformer3DModel", True), ("CogVideoXTransformer3DModel", True),  # video pipelines' transformers
    ("DDIMScheduler", True), ("EulerDiscreteScheduler", True), ("FlowMatchEulerDiscreteScheduler", True),
    # Kandinsky's movq, and classes that are no diffusers model (OnnxRuntimeModel reads model.onnx): checked only as they load.
    ("VQModel", False), ("AutoModel", False), ("EMAModel", False), ("OnnxRuntimeModel", False), ("VaeImageProcessor", False), ("T2IAdapter", False),
])
def test_a_diffusers_component_is_checked_for_only_the_files_its_class_loads_from(tmp_path, class_name, checked):
    # Told apart by name, without importing diffusers before the bind: a class taken for a model
    # or a scheduler that is neither would refuse a directory it loads; one the docs name left out
    # would let a partial copy of it through to after "listening on".
    import diffusers

    from explaind.config import component_files

    kind = getattr(diffusers, class_name)
    files = [path.name for path in component_files(tmp_path, "diffusers", class_name)]
    if not checked:
        assert files == []
    elif issubclass(kind, diffusers.SchedulerMixin):
        assert files == ["scheduler_config.json"]
    else:
        assert issubclass(kind, diffusers.ModelMixin) and files == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_no_diffusers_class_is_checked_for_files_it_does_not_load_from(tmp_path):
    # Every class diffusers exports (a model_index.json's ["diffusers", name] is one of them) that the
    # check asks files of: a scheduler reading scheduler_config.json, or a model reading config.json
    # and diffusion_pytorch_model weights; any other would stop the start of a pipeline that loads.
    import diffusers

    from explaind.config import component_files

    misread = []
    for name in dir(diffusers):
        files = [path.name for path in component_files(tmp_path, "diffusers", name)]
        if not files:
            continue
        try:
            kind = getattr(diffusers, name)
            config_name = kind.config_name
        except ImportError:  # a stand-in for a class whose backend (torchsde, flax) is not installed
            continue
        scheduler = isinstance(kind, type) and issubclass(kind, diffusers.SchedulerMixin) and config_name == files[0] == "scheduler_config.json"
        model = isinstance(kind, type) and issubclass(kind, diffusers.ModelMixin) and config_name == files[0] == "config.json"
        if not (scheduler and len(files) == 1 or model and files[1:] == ["diffusion_pytorch_model.safetensors"]):
            misread.append(name)
    assert misread == []


@pytest.mark.parametrize("names", [
    ["open_clip_model.safetensors", "a.safetensors", "pytorch_model.bin"],
    ["z.bin", "b.pth", "model.pth", "open_clip_pytorch_model.bin"],
    ["b.pth", "c.bin", "d.safetensors"],
    ["b.pth", "a.bin"],
])
def test_the_clip_weights_file_checked_is_the_one_open_clip_loads(tmp_path, names):
    from open_clip.factory import _find_checkpoint_in_dir

    from explaind.config import clip_weights_file

    for name in names:
        (tmp_path / name).write_text("")
    assert str(clip_weights_file(tmp_path)) == _find_checkpoint_in_dir(tmp_path)


def test_a_weights_file_as_clip_path_is_refused_before_the_bind_not_only_as_clip_loads(tmp_path, classifier_dir):
    # [clip].path is open_clip's directory; its weights file alone passed the check, readable.
    _open_clip_directory(tmp_path / "clip", classifier_dir)
    weights = tmp_path / "clip" / "open_clip_model.safetensors"
    problem = unusable_model_path(load_config(write_config(tmp_path / "c.toml", classifier_dir, clip={"path": str(weights)})))
    assert problem == (f"[clip].path {weights} is not a directory holding open_clip_config.json; a weights file alone is [clip].checkpoint, "
                       "with its architecture as [clip].model")


def test_a_clip_weights_file_removed_during_the_check_is_named_not_a_traceback(tmp_path, classifier_dir, monkeypatch):
    # The weights file is looked for twice (has the directory one; which one to read): gone between
    # the two, the second found None and _file_problem raised TypeError at start-up.
    import explaind.config as config_module

    _open_clip_directory(tmp_path / "clip", classifier_dir)
    config = load_config(write_config(tmp_path / "c.toml", classifier_dir, clip={"path": str(tmp_path / "clip")}))
    looked_up = config_module.clip_weights_file

    def removed_after_the_first_look(directory):
        found = looked_up(directory)
        if found is not None:
            found.unlink()
        return found

    monkeypatch.setattr(config_module, "clip_weights_file", removed_after_the_first_look)
    assert unusable_model_path(config) == f"[clip].path: not found: {tmp_path / 'clip' / 'open_clip_model.safetensors'}"


def test_a_model_path_with_a_nul_is_not_found_before_the_bind_not_a_traceback(tmp_path):
    # os.stat raises ValueError for it (a traceback at start-up); the loaders' Path.exists said "not found".
    (tmp_path / "c.toml").write_text('[classifier]\nloader = "onnx"\npath = "/models/a\\u0000b.onnx"\n')
    config = load_config(tmp_path / "c.toml")
    assert unusable_model_path(config) == "[classifier].path (an ONNX file) not found: /models/a\0b.onnx"


def test_a_resize_size_below_the_configured_image_size_stops_the_start_as_the_config_is_read(tmp_path, classifier_dir):
    # Refused only as the model loaded, after the server listened; the centre crop would not fit.
    with pytest.raises(ConfigError, match=re.escape("c.toml: [classifier].resize_size 63 is below the input size 64: the centre crop "
                                                    "would not fit (0 stretches whole images to the input size instead)")):
        config_with(tmp_path, classifier_dir, "classifier.resize_size", 63, image_size=64)
    assert config_with(tmp_path, classifier_dir, "classifier.resize_size", 64, image_size=64).classifier.resize_size == 64
    assert config_with(tmp_path, classifier_dir, "classifier.resize_size", 0, image_size=64).classifier.resize_size == 0  # stretched
    # The model's own size (image_size 0) is known only as it loads, which checks it then.
    assert config_with(tmp_path, classifier_dir, "classifier.resize_size", 16).classifier.resize_size == 16


@pytest.mark.parametrize("value", ["yes", 1])
def test_jpeg_reduced_decode_takes_true_or_false_and_refuses_another_value_by_name(tmp_path, classifier_dir, value):
    # A TOML 1 or "yes" is no boolean: read as true it would change the pixels every model sees.
    assert default_config().classifier.jpeg_reduced_decode is False
    assert config_with(tmp_path, classifier_dir, "classifier.jpeg_reduced_decode", True).classifier.jpeg_reduced_decode is True
    with pytest.raises(ConfigError, match=re.escape(f"c.toml: [classifier].jpeg_reduced_decode must be true or false, got {value!r}")):
        config_with(tmp_path, classifier_dir, "classifier.jpeg_reduced_decode", value)


@pytest.mark.parametrize(("factory", "refused"), [
    ("tiny_net", True), (":build", True), ("tiny_net:", True), ("tiny_net:build:more", True), ("tiny net:build", True),
    ("tiny_net:build.inner", True), ("tiny_net.:build", True), ("tiny_net:build", False), ("models.tiny_net:build", False),
    # Names importlib imports though no import statement could: my-model.py, 2024_net.py.
    ("my-model:build", False), ("models.2024_net:build", False), ("_private.réseau:build", False),
])
def test_a_factory_that_is_no_module_and_function_stops_the_start_as_the_config_is_read(tmp_path, classifier_dir, factory, refused):
    # Refused only as the model loaded, after the server listened (or imported as a module named "tiny net").
    needed = {"loader": "factory", "feature_layer": "layer3", "head": "fc"}
    if refused:
        with pytest.raises(ConfigError, match=re.escape(f"c.toml: [classifier].factory must be 'package.module:function', got {factory!r}")):
            config_with(tmp_path, classifier_dir, "classifier.factory", factory, **needed)
    else:
        assert config_with(tmp_path, classifier_dir, "classifier.factory", factory, **needed).classifier.factory == factory


def test_a_file_without_classifier_serves_the_worlds_and_relative_paths_are_the_files(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "c.toml").write_text('[server]\ndata_dir = "../data"\n')
    config = load_config(tmp_path / "conf" / "c.toml")
    assert config.server.data_dir == str(tmp_path / "data")  # resolved: no ".." left
    assert config.classifier == default_config().classifier


def test_a_config_file_beginning_with_a_byte_order_mark_is_read_as_without_it(tmp_path):
    # Windows Notepad and PowerShell 5 begin UTF-8 files with one: tomllib refused the file
    # as "Invalid statement (at line 1, column 1)", which no one could see in it.
    (tmp_path / "c.toml").write_bytes("\ufeff[server]\nport = 50100\n".encode())
    assert load_config(tmp_path / "c.toml").server.port == 50100
    (tmp_path / "c.toml").write_bytes("\ufeff[server]\nhost = \"caf".encode() + b'\xe9"\n')
    with pytest.raises(ConfigError, match=r"c.toml: not UTF-8 text \(byte 23\), as TOML must be$"):  # the file's byte, its mark counted
        load_config(tmp_path / "c.toml")


@pytest.mark.parametrize("section, key", [("server", "data_dir"), ("server", "token_file"), ("classifier", "weights"), ("diffusion", "path")])
def test_a_blank_path_in_the_file_is_refused_not_resolved_to_a_file_named_blank(tmp_path, section, key):
    (tmp_path / "c.toml").write_text(f'[{section}]\n{key} = " \t"\n')
    with pytest.raises(ConfigError, match=rf"c.toml: \[{section}\]\.{key} is blank: give a path, or leave the key out"):
        load_config(tmp_path / "c.toml")


def test_every_file_key_given_relative_is_relative_to_the_config_file(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "c.toml").write_text(
        '[server]\ndata_dir = "data"\ncallers_file = "callers"\n'
        'tls_cert_file = "cert.pem"\ntls_key_file = "key.pem"\ntls_client_ca_file = "ca.pem"\n'
        '[classifier]\npath = "model"\nweights = "w.pth"\nclass_names_file = "names.txt"\n'
        '[clip]\nmodel = "ViT-B-32"\ncheckpoint = "clip.safetensors"\n[diffusion]\npath = "sd"\n')
    config = load_config(tmp_path / "conf" / "c.toml")
    given = {"server": ["data_dir", "callers_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file"],
             "classifier": ["path", "weights", "class_names_file"], "clip": ["checkpoint"], "diffusion": ["path"]}
    values = [getattr(getattr(config, section), key) for section, keys in given.items() for key in keys]
    assert values == [str(tmp_path / "conf" / name) for name in
                      ("data", "callers", "cert.pem", "key.pem", "ca.pem", "model", "w.pth", "names.txt", "clip.safetensors", "sd")]
    (tmp_path / "conf" / "c.toml").write_text('[server]\ntoken_file = "token"\n')
    assert load_config(tmp_path / "conf" / "c.toml").server.token_file == str(tmp_path / "conf" / "token")


@pytest.mark.parametrize(("key", "value", "is_a_name"), [
    ("weights", "DEFAULT", True), ("weights", "ResNet50_Weights.IMAGENET1K_V2", True), ("weights", "sub/DEFAULT", False),
    ("weights", "resnet.PTH", False), ("checkpoint", "laion2b_s34b_b79k", True), ("checkpoint", "clip.bin", False),
    # Each weight file suffix, listed here: one dropped from explaind.config must fail.
    *[("weights", f"w{suffix}", False) for suffix in (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".pkl", ".npz")],
])
def test_weights_by_name_stay_names_and_weight_files_are_paths(tmp_path, key, value, is_a_name):
    weights, checkpoint = (value, "openai") if key == "weights" else ("DEFAULT", value)
    (tmp_path / "c.toml").write_text(f'[classifier]\nloader = "torchvision"\nname = "resnet18"\nweights = "{weights}"\n'
                                     f'[clip]\nmodel = "ViT-B-32"\ncheckpoint = "{checkpoint}"\n')
    section = "classifier" if key == "weights" else "clip"
    loaded = getattr(getattr(load_config(tmp_path / "c.toml"), section), key)
    assert loaded == (value if is_a_name else str(tmp_path / value))
    if is_a_name:  # unless a file of that name is beside the config
        (tmp_path / value).write_bytes(b"")
        assert getattr(getattr(load_config(tmp_path / "c.toml"), section), key) == str(tmp_path / value)


@pytest.mark.parametrize(("text", "problem"), [
    ("a\n", "line 1: expected NAME TOKEN, got 1 word(s)"),
    ("a tokenA\n#b tokenA\n", None),  # a comment: no second caller, no token given twice
    (f"{'n' * 64} tokenA\n", None),
    ("ci-bot_2.eu tokenA\n", None),  # a letter or digit, then letters, digits, "_", "." and "-"
    (f"{'n' * 65} tokenA\n", "line 1: the first word is no caller name"),
    (f"{'0' * 31}x tokenA\n", None),
    (f"{'0' * 32} tokenA\n", "line 1: the first word is 32 hex digits, a token rather than a caller name"),
    ("a tokenA\na tokenB\n", "line 2: caller 'a' is named on line 1 too"),
    ("a tok\u00e9n\n", "line 1: the token of 'a' holds a character other than printable ASCII"),
    ("a tok\x7fen\n", "line 1: the token of 'a' holds a character other than printable ASCII"),  # DEL, just past "~"
])
def test_callers_file_lines_at_the_edges_of_a_name_and_a_token(text, problem):
    if problem is None:
        assert list(parse_callers(text).values()) == ["tokenA"]
    else:
        with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            parse_callers(text)


def test_a_token_or_callers_file_that_cannot_be_used_is_refused_naming_its_key(tmp_path):
    (tmp_path / "latin1").write_bytes(b"a tok\xe9n\n")
    with pytest.raises(ConfigError, match=r"^\[server\]\.callers_file: cannot read .*latin1"):
        ServerSection(callers_file=str(tmp_path / "latin1")).named_callers()
    (tmp_path / "token").write_text("  \n")
    with pytest.raises(ConfigError, match=r"^\[server\]\.token_file: .*token is empty$"):
        ServerSection(token_file=str(tmp_path / "token")).bearer_token()
    (tmp_path / "token").write_text("tokenONE\n")
    assert ServerSection(token_file=str(tmp_path / "token")).bearer_token() == "tokenONE"


def test_a_configs_repr_never_shows_its_token():
    config = default_config().replace("server", token="tokenSECRET")
    assert "tokenSECRET" not in repr(config) and "tokenSECRET" not in str(config.server)
    assert config.server.token == "tokenSECRET" and "token_file=''" in repr(config.server)


def test_a_token_or_callers_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    # Windows Notepad's mark read as the token's first character: "holds a character other than printable ASCII".
    (tmp_path / "token").write_bytes(b"\xef\xbb\xbftokenONE\r\n")
    assert ServerSection(token_file=str(tmp_path / "token")).bearer_token() == "tokenONE"
    (tmp_path / "callers").write_bytes(b"\xef\xbb\xbfanalyst tokenANA\r\n")
    assert ServerSection(callers_file=str(tmp_path / "callers")).named_callers() == {"analyst": "tokenANA"}


def test_an_unset_illusion_epsilon_is_the_one_the_clip_s_directory_recommends(tmp_path, classifier_dir):
    # The world CLIP's cosines go down to -0.75: a file naming it without illusion_epsilon
    # got the paper's 0.05, and its visualisations rewarded lower activations.
    from explaind.world import assets

    world = {"path": str(assets.clip_dir())}
    assert config_with(tmp_path, classifier_dir, "clip.path", world["path"]).clip.default_epsilon() == WORLD_CLIP_ILLUSION_EPSILON
    chosen = config_with(tmp_path, classifier_dir, "clip.illusion_epsilon", 0.3, **world)
    assert chosen.clip.default_epsilon() == 0.3 and ignored_keys(chosen) == []  # a CLIP by path uses it
    assert config_with(tmp_path, classifier_dir, "clip.illusion_epsilon", 0.0, **world).clip.default_epsilon() == 0.0
    assert default_config().clip.default_epsilon() == WORLD_CLIP_ILLUSION_EPSILON
    (tmp_path / "other").mkdir()  # an open_clip directory recommending nothing: the paper's
    shutil.copy(assets.clip_dir() / "open_clip_config.json", tmp_path / "other")
    other = config_with(tmp_path, classifier_dir, "clip.path", str(tmp_path / "other"))
    assert other.clip.default_epsilon() == 0.05
    assert config_with(tmp_path, classifier_dir, "clip.model", "ViT-B-32", checkpoint="openai").clip.default_epsilon() == 0.05
    # A weights file given as path, or a path not there on this machine: the CLIP's load says what is wrong, not the config.
    for not_a_directory in (assets.clip_dir() / "open_clip_model.safetensors", tmp_path / "absent"):
        assert config_with(tmp_path, classifier_dir, "clip.path", str(not_a_directory)).clip.default_epsilon() == 0.05
    # The recommendation goes with the path, not with the config it was read from.
    assert default_config().replace("clip", path=str(tmp_path / "other")).clip.default_epsilon() == 0.05
    assert other.replace("clip", path=world["path"]).clip.default_epsilon() == WORLD_CLIP_ILLUSION_EPSILON


@pytest.mark.parametrize(("content", "problem"), [
    ("{", "not JSON"),
    (b'{"illusion_epsilon": 1} # \xe9', "cannot read it: 'utf-8' codec can't decode"),
    ("[1.0]", "must be a JSON object, got \\[1.0\\]"),
    ("[true, null]", "must be a JSON object, got \\[true, null\\]$"),  # as JSON writes it, not Python's [True, None]
    ('{"illusion_epsilon": "1"}', 'illusion_epsilon must be a number, got "1"'),
    ('{"illusion_epsilon": true}', "illusion_epsilon must be a number, got true$"),  # JSON's true is no 1; shown as JSON writes it
    ('{"illusion_epsilon": -0.5}', "illusion_epsilon must be in \\[0, 1000.0\\], got -0.5"),
    ('{"illusion_epsilon": NaN}', "illusion_epsilon must be in \\[0, 1000.0\\], got NaN"),
    ('{"illusion_epsilon": 1, "epsilon": 2}', "unknown key\\(s\\) \\['epsilon'\\]; expected \\['illusion_epsilon'\\]"),
])
def test_a_clip_recommendation_that_cannot_be_used_stops_the_start_naming_its_file(tmp_path, classifier_dir, content, problem):
    from explaind.config import CLIP_SETTINGS_FILE
    from explaind.world import assets

    (tmp_path / "clip").mkdir()
    shutil.copy(assets.clip_dir() / "open_clip_config.json", tmp_path / "clip")
    (tmp_path / "clip" / CLIP_SETTINGS_FILE).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=rf"c.toml: \[clip\]\.path: .*{CLIP_SETTINGS_FILE}: {problem}"):
        config_with(tmp_path, classifier_dir, "clip.path", str(tmp_path / "clip"))
    # An explicit ε needs no recommendation: the file is not read.
    assert config_with(tmp_path, classifier_dir, "clip.illusion_epsilon", 0.5, path=str(tmp_path / "clip")).clip.default_epsilon() == 0.5


def test_a_clip_recommendation_is_read_once_at_the_start_and_an_empty_one_recommends_nothing(tmp_path, classifier_dir):
    from explaind.config import CLIP_SETTINGS_FILE
    from explaind.world import assets

    for name, recommendation in (("kept", '{"illusion_epsilon": 0.5}'), ("empty", "{}")):
        (tmp_path / name).mkdir()
        shutil.copy(assets.clip_dir() / "open_clip_config.json", tmp_path / name)
        (tmp_path / name / CLIP_SETTINGS_FILE).write_text(recommendation)
    kept = config_with(tmp_path, classifier_dir, "clip.path", str(tmp_path / "kept"))
    # A request meets the ε the start checked: the file broken since is not read again.
    (tmp_path / "kept" / CLIP_SETTINGS_FILE).write_text("{")
    assert kept.clip.default_epsilon() == 0.5
    assert config_with(tmp_path, classifier_dir, "clip.path", str(tmp_path / "empty")).clip.default_epsilon() == 0.05  # the paper's

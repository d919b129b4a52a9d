"""Server configuration: a TOML file, or the shapes world when there is none.

Every section and key is optional; unknown keys are errors (a typo should not be
silently ignored). Example::

    [server]
    host = "0.0.0.0"
    port = 50051
    metrics_port = 9464        # 0 disables the Prometheus endpoint
    data_dir = "/var/lib/explaind"

    [classifier]
    loader = "torchvision"     # world | torchvision | export | torchscript | onnx | factory
    name = "resnet50"          # torchvision architecture
    weights = "/models/resnet50.pth"   # or torchvision weights by name: "DEFAULT", "IMAGENET1K_V2"
    feature_layer = "layer4"
    head = "fc"
    class_names_file = "/models/classes.txt"
    image_size = 224
    resize_size = 256          # shorter side to 256, then the central 224: a state-dict file stretches without it
    mean = [0.485, 0.456, 0.406]
    std = [0.229, 0.224, 0.225]

    [clip]
    model = "ViT-B-32"
    checkpoint = "/models/clip.safetensors"
    illusion_epsilon = 0.05    # CLIP-Illusion's default ε (needs cos + ε > 0); unset: the CLIP directory's, or 0.05

    [diffusion]
    path = "/models/sd-turbo"  # a diffusers pipeline directory

    [runtime]
    backend = "eager"          # eager | compile | onnxruntime | tensorrt
    device = "cpu"

    [batching]
    max_batch_size = 32
    max_queue_delay_ms = 0.0
    max_queue_size = 1024

    [tracing]
    otlp_endpoint = "http://otel-collector:4317"   # empty (the default): no tracing
    sample_ratio = 0.1
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import functools
import ipaddress
import json
import math
import os
import re
import stat
import sys
import tomllib
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .logs import LOG_FORMATS

CLASSIFIER_LOADERS = ("world", "torchvision", "export", "torchscript", "onnx", "factory")
BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt")
# The world CLIP's cosines to a mismatching class prompt reach -0.75: ε = 1 keeps cos + ε >= 0.
# Its directory says so in its CLIP_SETTINGS_FILE, so every config naming it gets this ε.
WORLD_CLIP_ILLUSION_EPSILON = 1.0
# The CLIP-Illusion paper's ε, for a CLIP that recommends none.
PAPER_ILLUSION_EPSILON = 0.05
# A JSON file beside an open_clip directory's open_clip_config.json ([clip].path) holding
# what explaind should use that CLIP with, {"illusion_epsilon": 1.0}: the ε travels with
# the model, not with whichever config names it.
CLIP_SETTINGS_FILE = "explaind.json"


# Sizes, counts and thread pools: 0 or less would fail later as a traceback or INTERNAL.
_AT_LEAST_ONE = (
    "server.max_message_bytes", "server.max_pixels_per_request", "server.max_decode_bytes",
    "batching.max_batch_size", "batching.max_queue_size", "batching.max_images_per_request",
    "jobs.max_queued", "jobs.gpu_workers", "jobs.evaluate_batch_size",
)
# Streams and waits (WatchOperation, WaitOperation, health's Watch) may hold half the gRPC
# threads, and one at least (explaind.service.interceptors.HeldCalls): with a single thread,
# one watch left none for any other call, Predict and CancelOperation included.
_AT_LEAST_TWO = ("server.max_workers",)
# 0 means something here (any port, no metrics, no grace, no reserve, no upload expiry, the model's size, stretched images,
# torch's threads, keeping operations, no run-time limit, no per-caller queue limit, 4 x max_workers); below 0 nothing does.
_NOT_NEGATIVE = (
    "server.port", "server.metrics_port", "server.health_port", "server.grace_period_s", "server.data_dir_reserve_bytes", "server.upload_idle_timeout_s", "batching.max_queue_delay_ms",
    "runtime.num_threads", "classifier.image_size", "classifier.resize_size", "jobs.retention_days", "jobs.max_run_seconds",
    "jobs.max_queued_per_caller", "batching.max_queued_images_per_caller", "server.max_samples_per_caller", "clip.illusion_epsilon", "tracing.sample_ratio",
    "server.max_concurrent_rpcs", "server.max_head_versions_per_caller",
)
_MAX_PORT = 65535
# Upper bounds. Sizes and counts that reach a C int (gRPC's channel arguments, torch's
# thread count) overflow beyond it; a delay or grace beyond these would overflow a timer
# (inf stops the batcher thread at the first Predict, or the shutdown), long before that
# it is a typo. ε is bounded as requests' ε is, so the configured default is one every
# request without an ε can take.
_C_INT_MAX = 2**31 - 1
# The largest float: TOML's integers have no bound in Python's reader, and a larger one given
# for a key of seconds overflowed in float().
_FLOAT_MAX = sys.float_info.max
# Upper bound of a request's loss weights (defaults 0.01-1), and of the configured ε: far
# above any useful value, far below where float32 losses overflow to inf and the weights
# they train turn NaN.
MAX_LOSS_WEIGHT = 1e3
# Threads: each gRPC worker, and each job worker, is an OS thread (stacks reserved, a task
# the kernel counts). 1e9 workers started a server that took calls until threads or memory
# ran out (and its 4 x max_workers held calls overflowed gRPC's C int). 4096 is far above
# use (one Python process runs one thread at a time; gRPC's examples use 10 workers), and at
# it the memory bound of docs/configuration.md is already 576 GiB at the default message size.
MAX_THREADS = 4096
# Largest accepted side of an image in pixels (larger inputs are refused before decoding),
# and so the largest input side and resize: beyond it every image is only enlarged, and
# 1e9 failed the start in an allocation of the model's probe images (2 x 3 x 1e9^2), 20000
# took 9.6 GB for them and every Predict image 4.8 GB.
MAX_IMAGE_SIDE = 4096
_AT_MOST = {
    "server.max_workers": MAX_THREADS, "jobs.gpu_workers": MAX_THREADS,
    "classifier.image_size": MAX_IMAGE_SIDE, "classifier.resize_size": MAX_IMAGE_SIDE,
    "server.max_message_bytes": _C_INT_MAX, "runtime.num_threads": _C_INT_MAX,
    # RequestLimits' int32 fields: a larger value failed every GetModelMetadata, and with it every SDK upload.
    "batching.max_batch_size": _C_INT_MAX, "batching.max_queue_size": _C_INT_MAX, "batching.max_images_per_request": _C_INT_MAX,
    "batching.max_queued_images_per_caller": _C_INT_MAX, "server.max_concurrent_rpcs": _C_INT_MAX, "server.max_samples_per_caller": _C_INT_MAX,
    "server.max_head_versions_per_caller": _C_INT_MAX,
    "server.grace_period_s": 86400.0, "batching.max_queue_delay_ms": 60_000.0, "clip.illusion_epsilon": MAX_LOSS_WEIGHT,
    "tracing.sample_ratio": 1.0,
}


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class ServerSection:
    host: str = "127.0.0.1"
    port: int = 50051
    # Prometheus /metrics over HTTP on the same host; 0 disables it.
    metrics_port: int = 0
    # The gRPC health service alone, in plaintext, on the same host (for probes that
    # cannot speak TLS, such as Kubernetes' gRPC probes); 0 disables it.
    health_port: int = 0
    data_dir: str = "var/explaind"
    # Bytes kept aside in the data dir (a file, explaind.reserve) and released when its file
    # system is full, so the server still starts and deletes still free space; 0: none.
    data_dir_reserve_bytes: int = 16 * 1024 * 1024
    max_message_bytes: int = 64 * 1024 * 1024
    # Pixels the images of one Predict / CreateSampleSet / AppendSamples call may decode
    # to in all (8 images of 4096x4096); bounds the memory and time a small request costs.
    max_pixels_per_request: int = 128 * 1024 * 1024
    # Bytes all calls' images may take at once while they decode (the estimate of each in
    # docs/configuration.md, Memory); a call waits for room within its deadline, and one
    # larger than this decodes alone. Decodes under 16 MiB are not counted.
    max_decode_bytes: int = 2 * 1024 * 1024 * 1024
    # Seconds that in-flight RPCs and jobs get to finish on shutdown; then RPCs are
    # cancelled and jobs end FAILED with code ABORTED.
    grace_period_s: float = 10.0
    # gRPC worker threads (streams and unary calls share them).
    max_workers: int = 64
    # Calls held at once, running or waiting for a worker thread (0: 4 x max_workers); past
    # it gRPC refuses a call RESOURCE_EXHAUSTED before reading its message. Unbounded,
    # waiting calls (each up to max_message_bytes) piled up in memory behind busy threads.
    max_concurrent_rpcs: int = 0

    @property
    def concurrent_rpcs(self) -> int:
        """The calls held at once: ``max_concurrent_rpcs``, or 4 x ``max_workers`` for 0."""
        return self.max_concurrent_rpcs or 4 * self.max_workers

    @property
    def calls_per_caller(self) -> int:
        """The Predict, CreateSampleSet and AppendSamples calls one named caller may have in
        progress at once: half of ``max_workers``, so its calls leave threads to the others."""
        return self.max_workers // 2
    # Seconds an upload in several requests may go without one before its set is deleted
    # (a client that died mid-upload left its images on disk until a restart); 0: only
    # a restart deletes it.
    upload_idle_timeout_s: float = 3600.0
    # When set, every call must carry "authorization: Bearer <token>". Not in the repr: a
    # config printed (a traceback's locals, a debugging print) must not show it.
    token: str = field(default="", repr=False)
    # A file whose content (less surrounding whitespace) is the token: a mounted Kubernetes
    # or Docker secret, so the token is in no config file. Read at start-up, and again when
    # it changes (explaind.service.auth), so a rotated secret needs no restart.
    token_file: str = ""
    # Named callers instead of one token: a file of lines "NAME TOKEN" (see parse_callers).
    # Each call names its caller by its token; what a caller creates is its own, and only
    # it (or an admin) may change it. Read at start-up and again when it changes.
    callers_file: str = ""
    # Callers of callers_file that may change anything, and the only ones that may
    # promote or roll back the served head (with none, every caller may).
    admins: tuple[str, ...] = ()
    # Samples one named caller's sets may hold in all; an upload that would pass it is
    # RESOURCE_EXHAUSTED, so one caller cannot fill the data dir for all (with the image
    # size limits, it bounds the caller's bytes). 0: no limit of its own.
    max_samples_per_caller: int = 0
    # Head versions of the served model one named caller's edits may hold (each one the
    # head's weights, 8 MB for ResNet-50); an EditHead past it is RESOURCE_EXHAUSTED, so
    # one caller's edits cannot fill the data dir for all. 0: no limit of its own.
    max_head_versions_per_caller: int = 0
    # Log lines on stderr: "text", or "json" (one object per line, for log pipelines).
    log_format: str = "text"
    # gRPC over TLS with this certificate chain and private key (PEM files), both or
    # neither; read again when they change, so a renewed certificate needs no restart.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # With it, every client must present a certificate this CA (PEM) signed: mutual TLS.
    tls_client_ca_file: str = ""

    def bearer_token(self) -> str:
        """The token calls must carry ("" = none): ``token``, or ``token_file``'s content.
        Raises ConfigError when the file cannot be read or holds no usable token."""
        if not self.token_file:
            return self.token
        try:
            token = read_utf8_text(self.token_file).strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"[server].token_file: cannot read {self.token_file}: {getattr(error, 'strerror', None) or error}") from None
        if problem := token_problem(token):
            raise ConfigError(f"[server].token_file: {self.token_file} {problem}")
        return token

    def named_callers(self) -> dict[str, str]:
        """Caller name -> token from ``callers_file`` ({} without one). Raises ConfigError
        when the file cannot be read, holds a bad line, or lacks an admin of ``admins``."""
        if not self.callers_file:
            return {}
        try:
            text = read_utf8_text(self.callers_file)
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"[server].callers_file: cannot read {self.callers_file}: {getattr(error, 'strerror', None) or error}") from None
        try:
            callers = parse_callers(text)
        except ValueError as error:
            raise ConfigError(f"[server].callers_file: {self.callers_file} {error}") from None
        if missing := [name for name in self.admins if name not in callers]:
            raise ConfigError(f"[server].admins: {missing[0]!r} is not a caller of {self.callers_file}")
        return callers


# A caller's name: what logs and owners show, so short and plain.
CALLER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
# 128 bits or more of lowercase hex: what token generators print, and no one's name.
_LOOKS_LIKE_A_TOKEN = re.compile(r"[0-9a-f]{32,}")


def parse_callers(text: str) -> dict[str, str]:
    """Caller name -> token from a callers file: one caller per line, ``NAME TOKEN``;
    blank lines and lines starting with ``#`` are skipped. ValueError naming the line
    (never quoting a token, nor a first word that is no name: it may be one) for a
    malformed line, a bad name or token, or a name or token given twice: two callers
    with one token could not be told apart; and for a file that
    names no caller, which would refuse every call (a rotation caught half-way, the file
    emptied before it is written, must keep the callers in force)."""
    callers: dict[str, str] = {}
    lines_of_tokens: dict[str, int] = {}
    lines_of_names: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"line {number}: expected NAME TOKEN, got {len(parts)} word(s)")
        name, token = parts
        if not CALLER_NAME.fullmatch(name):
            # Not quoted: a line written TOKEN NAME has the token there.
            raise ValueError(f"line {number}: the first word is no caller name (it must match {CALLER_NAME.pattern}; "
                             "a line is NAME TOKEN, in that order)")
        if _LOOKS_LIKE_A_TOKEN.fullmatch(name):
            # `openssl rand -hex 32` makes a valid caller name: written TOKEN NAME, the line
            # would parse, the guessable name would be the token, and the token be logged as a name.
            raise ValueError(f"line {number}: the first word is {len(name)} hex digits, a token rather than a caller name "
                             "(a line is NAME TOKEN, in that order)")
        if problem := token_problem(token):
            raise ValueError(f"line {number}: the token of {name!r} {problem}")
        if name in lines_of_names:
            raise ValueError(f"line {number}: caller {name!r} is named on line {lines_of_names[name]} too")
        if token in lines_of_tokens:
            raise ValueError(f"line {number}: the token of {name!r} is that of line {lines_of_tokens[token]} too")
        lines_of_names[name], lines_of_tokens[token] = number, number
        callers[name] = token
    if not callers:
        raise ValueError("names no caller (every call would be refused); one a line: NAME TOKEN")
    return callers


def read_utf8_text(path: str | Path) -> str:
    """``path``'s text as UTF-8, a leading byte order mark (Windows Notepad's, PowerShell 5's
    `-Encoding utf8`) dropped: tomllib refused a config with one as "Invalid statement (at line
    1, column 1)", and a token or callers file read it as a character "other than printable
    ASCII", neither of which a reader sees. Not "utf-8-sig", whose error offsets leave out the
    mark. Raises OSError or UnicodeDecodeError."""
    return Path(path).read_bytes().decode("utf-8").removeprefix("\ufeff")


def token_problem(token: str) -> str | None:
    """Why ``token`` cannot be a bearer token (None if it can): callers send it in gRPC
    metadata, which carries printable ASCII only, so any other character (a second line,
    an accent) would make every call fail. Never quotes the token."""
    if not token:
        return "is empty"
    if not all("!" <= character <= "~" for character in token):
        return "holds a character other than printable ASCII (spaces and line breaks included), which no caller could send"
    return None


@dataclass(frozen=True)
class ClassifierSection:
    loader: str = "world"
    # world: directory with config.json + model.safetensors; export (.pt2)/torchscript/onnx: file;
    # torchvision: unused (see name/weights).
    path: str = ""
    # torchvision architecture name (e.g. "resnet18").
    name: str = ""
    # torchvision state-dict file (.pth / .safetensors).
    weights: str = ""
    # factory: "package.module:function" returning an nn.Module.
    factory: str = ""
    factory_kwargs: dict[str, Any] = field(default_factory=dict)
    feature_layer: str = ""
    head: str = ""
    class_names: tuple[str, ...] = ()
    class_names_file: str = ""
    # Square input size; images of other sizes are fitted to it (see resize_size).
    image_size: int = 0
    # 0: images are stretched to image_size. Else their shorter side is resized to this
    # and the central image_size square cropped (torchvision's evaluation transform).
    # Unset: torchvision weights by name bring theirs; other models stretch.
    resize_size: int | None = None
    # "bilinear" or "bicubic" (antialiased); empty: torchvision weights by name bring
    # theirs, other models are resized bilinearly.
    interpolation: str = ""
    # JPEG files decoded at 1/2, 1/4 or 1/8 scale, at least twice the side they are resized
    # from: several times faster on large photos, in pixels slightly unlike the whole image
    # resized (what the model was trained on), so off unless chosen.
    jpeg_reduced_decode: bool = False
    # Normalisation applied before the model; empty = the model normalises itself.
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


@dataclass(frozen=True)
class ClipSection:
    # An open_clip architecture name with ``checkpoint`` (a weights file or a pretrained
    # tag), or ``path``: a directory holding open_clip_config.json and its weights.
    model: str = ""
    checkpoint: str = ""
    path: str = ""
    # CLIP-Illusion's ε when a request sets none. The loss -(cos + ε)·(α_n + γ l_c)
    # rewards the neuron only while cos + ε > 0: real CLIPs give image-text cosines of
    # about 0.2-0.35, so the paper's 0.05 suffices; a CLIP whose cosines go negative
    # (the shapes world's) needs about 1. Unset: see default_epsilon().
    illusion_epsilon: float | None = None

    def default_epsilon(self) -> float:
        """CLIP-Illusion's ε for a request without one: ``illusion_epsilon``; unset, the one
        ``path``'s CLIP_SETTINGS_FILE recommends (the shapes world's CLIP: 1.0), else the
        paper's 0.05. ConfigError naming the file when its recommendation cannot be used."""
        if self.illusion_epsilon is not None:
            return self.illusion_epsilon
        recommended = _recommended_epsilon(self.path) if self.path else None
        return PAPER_ILLUSION_EPSILON if recommended is None else recommended


@functools.cache  # read once, as the CLIP is loaded once: a request meets what the start checked
def _recommended_epsilon(directory: str) -> float | None:
    """The ``illusion_epsilon`` of ``directory``'s CLIP_SETTINGS_FILE; None without one."""
    settings_file = Path(directory) / CLIP_SETTINGS_FILE
    where = f"[clip].path: {settings_file}"
    try:
        settings = json.loads(settings_file.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):  # no recommendation; a path that is no CLIP directory is load_clip's to refuse
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{where}: cannot read it: {getattr(error, 'strerror', None) or error}") from None
    except ValueError as error:
        raise ConfigError(f"{where}: not JSON: {error}") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: must be a JSON object, got {json.dumps(settings)}")
    if unknown := set(settings) - {"illusion_epsilon"}:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; expected ['illusion_epsilon']")
    epsilon = settings.get("illusion_epsilon")
    if epsilon is None:
        return None
    # Values shown as JSON, as the file holds them: true, not Python's True.
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        raise ConfigError(f"{where}: illusion_epsilon must be a number, got {json.dumps(epsilon)}")
    if not 0 <= epsilon <= MAX_LOSS_WEIGHT:  # a request's ε's range; NaN is in none
        raise ConfigError(f"{where}: illusion_epsilon must be in [0, {MAX_LOSS_WEIGHT}], got {json.dumps(epsilon)}")
    return float(epsilon)


@dataclass(frozen=True)
class DiffusionSection:
    path: str = ""


@dataclass(frozen=True)
class RuntimeSection:
    backend: str = "eager"
    device: str = "cpu"
    # torch's and ONNX Runtime's intra-op threads; 0 keeps their defaults.
    num_threads: int = 0


@dataclass(frozen=True)
class BatchingSection:
    max_batch_size: int = 32
    # How long the batcher waits for more requests once it has one; 0 = take what is
    # queued right now (batches still form under load, and a lone request never waits).
    max_queue_delay_ms: float = 0.0
    # Images waiting for the model; beyond this Predict returns RESOURCE_EXHAUSTED.
    max_queue_size: int = 1024
    # Most images one Predict call may carry.
    max_images_per_request: int = 1024
    # Images one named caller ([server].callers_file) may have waiting; a Predict that would
    # pass it is RESOURCE_EXHAUSTED (a caller with none waiting may always queue one call),
    # so one caller cannot fill max_queue_size for all. 0: no limit of its own.
    max_queued_images_per_caller: int = 0


@dataclass(frozen=True)
class JobsSection:
    # Jobs waiting to run; beyond this, submitting returns RESOURCE_EXHAUSTED.
    max_queued: int = 64
    # Jobs one named caller ([server].callers_file) may have waiting to run; beyond this,
    # its submit returns RESOURCE_EXHAUSTED, so one caller cannot fill the queue for all.
    # 0: no limit of its own (max_queued alone), as without named callers.
    max_queued_per_caller: int = 0
    # Concurrent accelerator-bound jobs (1 = they serialise).
    gpu_workers: int = 1
    evaluate_batch_size: int = 64
    # Finished operations (records, results, artifacts) are deleted this many days after
    # they ended; 0 keeps them until DeleteOperation.
    retention_days: float = 30.0
    # A job running longer than this (seconds) ends FAILED (DEADLINE_EXCEEDED) at its next
    # cancellation check, freeing its worker for the jobs queued behind it; 0: no limit.
    max_run_seconds: float = 0.0


@dataclass(frozen=True)
class TracingSection:
    # An OTLP/gRPC collector, "http://host:4317" (plaintext) or "https://host:4317" (TLS),
    # that spans go to (explaind.tracing); empty: no tracing. Needs the tracing extra.
    otlp_endpoint: str = ""
    # The service.name resource attribute of the spans.
    service_name: str = "explaind"
    # Traces started here that are kept (0-1); a caller's trace keeps its caller's decision.
    sample_ratio: float = 1.0


@dataclass(frozen=True)
class Config:
    server: ServerSection = ServerSection()
    classifier: ClassifierSection = ClassifierSection()
    clip: ClipSection = ClipSection()
    diffusion: DiffusionSection = DiffusionSection()
    runtime: RuntimeSection = RuntimeSection()
    batching: BatchingSection = BatchingSection()
    jobs: JobsSection = JobsSection()
    tracing: TracingSection = TracingSection()
    source: str = "<defaults: shapes world>"
    # The keys the file sets, as "section.key": what ignored_keys may warn of (a default,
    # or a value the defaults put in, is no one's mistake).
    file_keys: frozenset[str] = frozenset()

    @property
    def models_required(self) -> bool:
        """Whether every model configured must load: those named in a config file must; the
        shapes world's optional ones (CLIP, text-to-image) may be absent."""
        return not self.source.startswith("<defaults")

    def replace(self, section: str, **changes: Any) -> Config:
        """A copy with keys of one section changed, e.g. ``config.replace("server", port=0)``,
        whose values are checked like a loaded file's (ranges and formats; ConfigError), so
        command-line overrides get no free pass. Types are the caller's to get right."""
        changed = dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})
        _validate(self.source, changed)
        return changed


def default_config() -> Config:
    """The shapes world: balanced classifier, CLIP and text-to-image when shipped."""
    from .world import assets

    return Config(
        classifier=ClassifierSection(loader="world", path=str(assets.classifier_dir("balanced"))),
        clip=ClipSection(path=str(assets.clip_dir())),  # its ε is its directory's
        diffusion=DiffusionSection(path=str(assets.t2i_dir())),
    )


def _is_ipv6_address(text: str) -> bool:
    """Whether ``text`` is an IPv6 address ("::1", "fe80::1%eth0"): the one kind of host with a colon."""
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def requested_log_format(path: str | Path) -> str | None:
    """The ``[server].log_format`` a config file sets, read without checking the rest: a
    file that fails to load still reports that in the format it asked for (a log pipeline
    reading JSON got the CLI's plain ``error:`` line). None where the file cannot be read
    as TOML or sets no format it could use."""
    try:
        server = tomllib.loads(read_utf8_text(path)).get("server")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    log_format = server.get("log_format") if isinstance(server, dict) else None
    return log_format if log_format in LOG_FORMATS else None


def load_config(path: str | Path | None = None) -> Config:
    """Parse a TOML config; with ``None`` the shapes-world defaults. Relative paths in
    the file are resolved against the file's directory."""
    if path is None:
        return default_config()
    path = Path(path)
    try:
        raw = tomllib.loads(read_utf8_text(path))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as error:  # a directory, or unreadable
        raise ConfigError(f"cannot read the config file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}), as TOML must be") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    sections = {f.name: f for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default)}
    unknown = set(raw) - set(sections)
    if unknown:
        hints = _unknown_hints(unknown, sections, section_hint=True)
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}{hints}; expected {sorted(sections)}")
    defaults = default_config()
    parsed: dict[str, Any] = {}
    for name, section_field in sections.items():
        if name not in raw:
            # No [classifier]: the world's. No [clip]/[diffusion]: none (not the world's).
            parsed[name] = defaults.classifier if name == "classifier" else section_field.default
            continue
        parsed[name] = _parse_section(path, name, section_field.default, raw[name])
    file_keys = frozenset(f"{name}.{key}" for name, body in raw.items() for key in body)
    config = Config(**parsed, source=str(path), file_keys=file_keys)
    _validate(path, config)
    return config


def _unknown_hints(unknown: set[str], known: Iterable[str], *, section_hint: bool = False) -> str:
    """What each of ``unknown`` (keys of one section, or sections) likely meant, as
    " (...)", or "": the sections it is a key of (written in the wrong one, or above every
    section), else the known name it is a typo of; the expected list alone left a typo to
    be found among 28 keys, and said nothing of a key in the wrong section."""
    sections_of: dict[str, list[str]] = {}
    for section in dataclasses.fields(Config):
        for key in dataclasses.fields(section.default) if dataclasses.is_dataclass(section.default) else ():
            sections_of.setdefault(key.name, []).append(f"[{section.name}]")
    hints = []
    for name in sorted(unknown):
        if name in sections_of:
            hints.append(f"{name!r} is a key of {', '.join(sections_of[name])}")
        elif close := difflib.get_close_matches(name, list(known), n=1):
            hints.append(f"{name!r}: did you mean {f'[{close[0]}]' if section_hint else repr(close[0])}?")
    return f" ({'; '.join(hints)})" if hints else ""


# Keys whose value a refusal must not quote: it reaches logs and terminals.
_SECRET_KEYS = frozenset({"token"})


def _parse_section(path: Path, name: str, default: Any, body: Any) -> Any:
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(default)}
    unknown = set(body) - set(fields)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)} in [{name}]{_unknown_hints(unknown, fields)}; expected {sorted(fields)}")
    values: dict[str, Any] = {}
    for key, value in body.items():
        expected = getattr(default, key)
        if expected is None:  # an optional key, unset by default: typed by its annotation
            expected = _OPTIONAL_TYPE_EXAMPLES[fields[key].type]
        where = f"{path}: [{name}].{key}"
        shown = "a value not shown (a secret's)" if key in _SECRET_KEYS else _as_toml(value)
        if isinstance(expected, bool) or isinstance(expected, str):
            if not isinstance(value, type(expected)):
                raise ConfigError(f"{where} must be {_TYPE_WORDS[type(expected)]}, got {shown}")
        elif isinstance(expected, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where} must be a number, got {shown}")
            if isinstance(expected, int) and not isinstance(value, int):
                raise ConfigError(f"{where} must be an integer, got {shown}")
            if isinstance(expected, float) and isinstance(value, int) and abs(value) > _FLOAT_MAX:
                # float() of it was an OverflowError traceback; read as TOML's 1e400 is, the
                # key's own bounds then speak ("must be at least 0, got -inf")
                value = math.inf if value > 0 else -math.inf
            value = type(expected)(value)
        elif isinstance(expected, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where} must be a table, got {shown}")
        elif isinstance(expected, tuple):
            if not isinstance(value, list):
                raise ConfigError(f"{where} must be a list, got {shown}")
            item_type = _LIST_ITEM_TYPES[key]
            if not all(isinstance(item, item_type) and not isinstance(item, bool) for item in value):
                raise ConfigError(f"{where} must be a list of {_ITEM_TYPE_WORDS[item_type]}, got {shown}")
            value = tuple(value)
        if key in _PATH_KEYS and value and not value.strip():  # it would resolve to a file named " " beside the config
            raise ConfigError(f"{where} is blank: give a path, or leave the key out")
        if key in _PATH_KEYS and value.startswith("~"):
            try:
                value = str(Path(value).expanduser())
            except RuntimeError:  # ~nosuchuser, or no home directory
                raise ConfigError(f"{where}: cannot expand {value!r}: no such user or home directory") from None
        if key in _PATH_KEYS and value and not Path(value).is_absolute():
            if key not in ("weights", "checkpoint") or not _names_pretrained_weights(value) or (path.parent / value).exists():
                value = str((path.parent / value).resolve())
        values[key] = value
    return dataclasses.replace(default, **values)


# Interpolations a classifier's inputs may be resized with (torchvision's names).
INTERPOLATIONS = ("bilinear", "bicubic")

# What a list key's items must be, and how a refusal names it.
_LIST_ITEM_TYPES: dict[str, type | tuple[type, ...]] = {"class_names": str, "admins": str, "mean": (int, float), "std": (int, float)}
_ITEM_TYPE_WORDS = {str: "strings", (int, float): "numbers"}
# How a refusal names the type a key takes, in an operator's words ("must be a str" was Python's).
_TYPE_WORDS = {str: "a string", bool: "true or false"}


def _choices(values: Iterable[str]) -> str:
    """The values a key takes as the file writes them, 'a', 'b' or 'c', not as a Python tuple."""
    *rest, last = [_as_toml(value) for value in values]
    return f"{', '.join(rest)} or {last}" if rest else last


def _as_toml(value: Any) -> str:
    """``value`` as the file wrote it: TOML's true, a date as written, not Python's
    True or datetime.date(2024, 1, 1); strings quoted as a TOML literal string may be."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, list):
        return f"[{', '.join(map(_as_toml, value))}]"
    if isinstance(value, dict):
        return f"{{{', '.join(f'{key} = {_as_toml(item)}' for key, item in value.items())}}}"
    return repr(value)

# A value of each type optional keys are annotated with, to check a given value against.
_OPTIONAL_TYPE_EXAMPLES = {"int | None": 0, "float | None": 0.0}

# Keys holding a file or directory: relative values are relative to the config file.
_PATH_KEYS = ("path", "weights", "checkpoint", "class_names_file", "data_dir", "token_file", "callers_file",
              "tls_cert_file", "tls_key_file", "tls_client_ca_file")

# Suffixes of weight files; a weights/checkpoint value without a path separator or one
# of these names pretrained weights instead (torchvision "DEFAULT" or
# "ResNet50_Weights.IMAGENET1K_V2", open_clip "openai" or "laion2b_s34b_b79k").
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".pkl", ".npz")


def _names_pretrained_weights(value: str) -> bool:
    return "/" not in value and "\\" not in value and Path(value).suffix.lower() not in WEIGHT_FILE_SUFFIXES


def _validate_device(path: Path | str, runtime: RuntimeSection) -> None:
    """A malformed device string is a config mistake; whether CUDA is present is checked
    when the models load (FailedPrecondition), since configs travel between machines.
    Only CPU and CUDA are served: torch parses "meta" or "mps" too, but "meta" drops the
    weights (every Predict failed) and MPS lacks the float64 sums the methods keep."""
    import torch

    message = f"{path}: [runtime].device must be a torch device such as \"cpu\", \"cuda\" or \"cuda:1\", got {runtime.device!r}"
    try:
        device = torch.device(runtime.device)
    except (RuntimeError, TypeError):
        raise ConfigError(message) from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{message}: explaind runs on the CPU or CUDA GPUs")
    if runtime.backend == "tensorrt" and device.type != "cuda":
        # Its providers would otherwise take GPU 0 while the server reported the CPU.
        raise ConfigError(f"{path}: [runtime].backend \"tensorrt\" runs on a GPU: set [runtime].device to \"cuda\" or \"cuda:N\", got {runtime.device!r}")


def _endpoint_problem(endpoint: str) -> str | None:
    """Why ``endpoint`` is no http(s)://host[:port] URL (None if it is): without a scheme
    the OTLP exporter speaks TLS, and a plaintext collector (the usual one in a cluster)
    refuses it, the failures only in the log; the scheme says which it is."""
    try:
        url = urllib.parse.urlsplit(endpoint)
        url.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as error:
        return str(error)
    if url.scheme not in ("http", "https"):
        return "the scheme must be http or https"
    if not url.hostname:
        return "no host"
    if url.path.strip("/") or url.query or url.fragment:
        return "a path, which gRPC has no use for"
    return None


# What each loader cannot start without: (key, what it holds). Checked as the config is
# read, so a server missing one stops before it listens, not as its models load.
_CLASSIFIER_NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "world": (("path", "a world classifier directory"),),
    "torchvision": (("name", "an architecture, e.g. 'resnet18'"), ("weights", "a state-dict file, or weights by name such as 'DEFAULT'")),
    "export": (("path", "a .pt2 file from torch.export.save"),),
    "torchscript": (("path", "a TorchScript file"),),
    "onnx": (("path", "an ONNX file"),),
    "factory": (("factory", "'package.module:function' returning an nn.Module"), ("feature_layer", "the module whose output is the features"),
                ("head", "the final nn.Linear")),
}


def missing_classifier_key(section: ClassifierSection) -> str | None:
    """What ``section``'s loader needs and lacks, as a message; None when it has it all."""
    for key, meaning in _CLASSIFIER_NEEDS.get(section.loader, ()):
        if not getattr(section, key):
            return f"[classifier] loader {section.loader!r} needs {key} ({meaning})"
    return None


def unusable_model_path(config: Config) -> str | None:
    """Why a model file or directory the config names cannot be used (missing, or not
    readable by this process), or a file its loader reads inside a directory
    (_directory_problem), naming its key; None when each can be opened. Stats, access
    checks and one small JSON read, so serve() says it before it listens rather than once
    the models load in the background, after "listening on" was logged."""
    classifier = config.classifier
    needs = dict(_CLASSIFIER_NEEDS.get(classifier.loader, ()))
    keys = [("classifier", key, needs.get(key, "")) for key in ("path", "weights") if key in _LOADER_READS.get(classifier.loader, ())]
    if not classifier.class_names:  # else unread: class_names wins (ignored_keys says so)
        keys.append(("classifier", "class_names_file", ""))
    if config.models_required:
        keys += [("clip", "path", ""), ("clip", "checkpoint", ""), ("diffusion", "path", "")]
    for section, key, meaning in keys:
        value = getattr(getattr(config, section), key)
        if not value or (key in ("weights", "checkpoint") and _names_pretrained_weights(value)):
            continue
        where = f"[{section}].{key}" + (f" ({meaning})" if meaning else "")
        if why := _unreadable(value):
            return f"{where} not found: {value}" if why == _NOT_FOUND else f"{where}: cannot read {value}: {why}"
        if key == "path" and (problem := _directory_problem(f"[{section}].{key}", section, classifier.loader, Path(value))):
            return problem
    return None


_NOT_FOUND = "not found"


def _unreadable(path: str | Path) -> str | None:
    """_NOT_FOUND, or why this process cannot read ``path`` (a directory: list and search
    it), or None when it can."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in it, which Path.exists (the loaders') calls absent
        return _NOT_FOUND
    except OSError as error:  # a directory above it this user may not search
        return error.strerror
    return None if os.access(path, os.R_OK | (os.X_OK if stat.S_ISDIR(mode) else 0)) else "Permission denied"


# The shapes world's text-to-image layout, a diffusers directory without model_index.json: each
# part's folder and the (library, class) world.t2i's load_world_t2i loads it with.
WORLD_T2I_COMPONENTS = {"vae": ("explaind", "PixelShuffleAutoencoder"), "unet": ("diffusers", "UNet2DConditionModel"),
                        "scheduler": ("diffusers", "DDIMScheduler")}
WORLD_T2I_PARTS = tuple(WORLD_T2I_COMPONENTS)
# What a world classifier directory holds (world.classifier's save_classifier writes them).
WORLD_CLASSIFIER_FILES = ("config.json", "model.safetensors")
# What open_clip reads of a [clip].path directory: its config, and one weights file of these.
CLIP_DIRECTORY_CONFIG = "open_clip_config.json"
CLIP_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")
# The weights file open_clip's local-dir: loading takes first where a directory holds several
# (open_clip.factory's _find_checkpoint_in_dir), else the first by name, .safetensors first.
CLIP_PREFERRED_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                          "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
# A diffusers model's config, and its weights as from_pretrained (no variant) looks for them, in
# turn: a sharded safetensors index (with the shards it names), one safetensors file, one .bin.
DIFFUSERS_MODEL_CONFIG = "config.json"
DIFFUSERS_SCHEDULER_CONFIG = "scheduler_config.json"
DIFFUSERS_WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def diffusion_directory_problem(directory: Path) -> str | None:
    """Why ``directory`` is neither a diffusers pipeline (model_index.json) nor the shapes
    world's layout (WORLD_T2I_PARTS), naming the parts a copy left out; None when it is one."""
    if (directory / "model_index.json").is_file():
        return None
    if missing := [f"{part}/" for part in WORLD_T2I_PARTS if not (directory / part).is_dir()]:
        present = [f"{part}/" for part in WORLD_T2I_PARTS if f"{part}/" not in missing]
        return f"[diffusion].path: not found: {directory / 'model_index.json'} (nor {', '.join(missing)}{'; it has ' + ', '.join(present) if present else ''})"
    return None


def clip_directory_problem(directory: Path) -> str | None:
    """Why open_clip cannot load ``directory`` ([clip].path), or None: without its config
    it said "Directory ... not found" of a file; without a weights file it loads a randomly
    initialised CLIP, with a warning, which clip_illusion would then optimise against."""
    if not (directory / CLIP_DIRECTORY_CONFIG).is_file():
        return (f"[clip].path {directory} is not a directory holding {CLIP_DIRECTORY_CONFIG}; a weights "
                "file alone is [clip].checkpoint, with its architecture as [clip].model")
    if clip_weights_file(directory) is None:
        return (f"[clip].path {directory} has no weights file (open_clip_model.safetensors, or another "
                f".safetensors, .bin or .pth file) beside its {CLIP_DIRECTORY_CONFIG}")
    return None


def clip_weights_file(directory: Path) -> Path | None:
    """The one weights file open_clip loads of ``directory`` (CLIP_PREFERRED_WEIGHTS), or None."""
    candidates = sorted((path for suffix in CLIP_WEIGHT_SUFFIXES for path in directory.glob(f"*{suffix}")),
                        key=lambda path: (path.suffix != ".safetensors", path))
    preferred = [path for path in candidates if path.name in CLIP_PREFERRED_WEIGHTS]
    return min(preferred, key=lambda path: CLIP_PREFERRED_WEIGHTS.index(path.name)) if preferred else next(iter(candidates), None)


def _diffusion_components(directory: Path) -> tuple[str | None, dict[str, tuple[str, str]]]:
    """(why model_index.json cannot be used, or None; component folder -> (library, class)
    the pipeline loads it with): those model_index.json names, else WORLD_T2I_COMPONENTS."""
    index_file = directory / "model_index.json"
    if not index_file.is_file():
        return None, WORLD_T2I_COMPONENTS
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except OSError as error:
        return f"cannot read {index_file}: {error.strerror}", {}
    except ValueError as error:
        return f"{index_file} is not JSON: {error}", {}
    if not isinstance(index, dict):
        return f"{index_file} is not a JSON object", {}
    return None, pipeline_components(index)


def pipeline_components(index: object) -> dict[str, tuple[str, str]]:
    """Component -> (library, class) of a diffusers model_index.json's parsed ``index``:
    the entries diffusers loads a folder for ({} when it is no JSON object). Skipped:
    "_class_name" and the like, and [null, null] (a component left out)."""
    if not isinstance(index, dict):
        return {}
    return {component: (value[0], value[1]) for component, value in index.items()
            if isinstance(value, list) and len(value) == 2 and all(isinstance(part, str) for part in value)}


def component_files(folder: Path, library: str, class_name: str) -> list[Path]:
    """The files loading component ``class_name`` of ``library`` from ``folder`` opens, each
    whether there or not (absent weights: the first name diffusers looks for): a diffusers
    scheduler's config; a diffusers model's config and weights (DIFFUSERS_WEIGHTS_INDEX,
    DIFFUSERS_WEIGHTS); the world's weightless autoencoder's config. [] for another class
    (transformers', a package's own): which files it opens is its library's to say, as it loads.
    By name, as diffusers names them, so that the check imports no library: every diffusers
    scheduler's ends in "Scheduler"; its models' named so are, of others, not all."""
    if library == "diffusers" and class_name.endswith("Scheduler"):
        return [folder / DIFFUSERS_SCHEDULER_CONFIG]
    if (library, class_name) == WORLD_T2I_COMPONENTS["vae"]:
        return [folder / DIFFUSERS_MODEL_CONFIG]
    if library == "diffusers" and (class_name.startswith(("UNet", "Autoencoder"))
                                   or class_name.endswith(("Transformer2DModel", "Transformer3DModel", "ControlNetModel"))):
        return [folder / DIFFUSERS_MODEL_CONFIG, *_diffusers_weight_files(folder)]
    return []


def _diffusers_weight_files(folder: Path) -> list[Path]:
    """The weights files a diffusers model's from_pretrained reads of ``folder``: the index
    and the shards it names (only the index where it is no such JSON: loading says why), else
    the first of DIFFUSERS_WEIGHTS there (as diffusers, os.path.isfile)."""
    index_file = folder / DIFFUSERS_WEIGHTS_INDEX
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8")).get("weight_map")
            shards = sorted({folder / name for name in weight_map.values()})
        except (OSError, ValueError, AttributeError, TypeError):
            shards = []
        return [index_file, *shards]
    return [next((folder / name for name in DIFFUSERS_WEIGHTS if (folder / name).is_file()), folder / DIFFUSERS_WEIGHTS[0])]


def _directory_problem(where: str, section: str, loader: str, directory: Path) -> str | None:
    """Why a file the loader of ``section`` reads inside ``directory`` (``where``, a key)
    is missing or unreadable, or None: a diffusers pipeline's model_index.json, each
    component folder it names (or the world layout's) and the files loading it opens
    (component_files), open_clip's config and the weights file it loads, a world
    classifier's files. Another file in them is no loader's, and not looked at. Only what
    is known without importing the libraries: what they make of the files comes as the
    models load."""
    files: list[Path] = []
    if section == "diffusion":
        if problem := diffusion_directory_problem(directory):
            return problem
        problem, components = _diffusion_components(directory)
        if problem:
            return f"{where}: {problem}"
        for component, (library, class_name) in components.items():
            folder = directory / component
            if problem := _file_problem(where, folder):
                return problem
            if not folder.is_dir():  # diffusers would load the component from the pipeline's root instead
                return f"{where}: not a directory: {folder}"
            files += component_files(folder, library, class_name)
    elif section == "clip":
        if problem := clip_directory_problem(directory):
            return problem
        # a weights file removed since the check above is reported as the preferred one missing
        files = [directory / CLIP_DIRECTORY_CONFIG, clip_weights_file(directory) or directory / CLIP_PREFERRED_WEIGHTS[0]]
    elif section == "classifier" and loader == "world":
        files = [directory / name for name in WORLD_CLASSIFIER_FILES]
    return next(filter(None, map(functools.partial(_file_problem, where), files)), None)


def _file_problem(where: str, path: Path) -> str | None:
    """Why ``path`` in the directory of key ``where`` is missing or unreadable, or None."""
    if why := _unreadable(path):
        return f"{where}: {why}: {path}" if why == _NOT_FOUND else f"{where}: cannot read {path}: {why}"
    return None


def resize_size_problem(resize_size: int, image_size: int) -> str | None:
    """Why images cannot have their shorter side resized to ``resize_size`` and the central
    ``image_size`` square cropped (None when they can; 0 stretches them). Checked as the
    config is read, for the sizes it sets, and as the model loads, with the model's own."""
    if resize_size and resize_size < image_size:
        return (f"[classifier].resize_size {resize_size} is below the input size {image_size}: the centre crop "
                "would not fit (0 stretches whole images to the input size instead)")
    return None


def parse_factory(factory: str) -> tuple[str, str]:
    """(module, function) of a [classifier].factory, "package.module:function"; ConfigError
    naming the key when it is none (as the config is read, not once the server listens)."""
    module, _, function = factory.partition(":")
    # Modules as importlib finds them, not only identifiers: a file my-model.py imports as
    # "my-model" (as it did before this check); no part may be empty or hold a space.
    if not (all(part and not any(c.isspace() for c in part) for part in module.split(".")) and function.isidentifier()):
        raise ConfigError(f"[classifier].factory must be 'package.module:function', got {factory!r}")
    return module, function


# The [classifier] keys each loader reads (engine/models.py) besides those every one
# reads, _EVERY_LOADER_READS: the class names, and how images reach the model.
_LOADER_READS: dict[str, tuple[str, ...]] = {
    "world": ("path", "feature_layer", "head"),
    "torchvision": ("name", "weights", "feature_layer", "head"),
    "export": ("path", "feature_layer", "head"),
    "torchscript": ("path",),
    "onnx": ("path",),
    "factory": ("factory", "factory_kwargs", "weights", "feature_layer", "head"),
}
_EVERY_LOADER_READS = ("loader", "class_names", "class_names_file", "image_size", "resize_size", "interpolation", "jpeg_reduced_decode",
                       "mean", "std")
# Keys that limit one named caller: without [server].callers_file no call has one.
_PER_CALLER_KEYS = ("server.max_samples_per_caller", "server.max_head_versions_per_caller", "batching.max_queued_images_per_caller",
                    "jobs.max_queued_per_caller")


def ignored_keys(config: Config) -> list[str]:
    """A warning for each group of keys the file sets (to other than their defaults) that
    the rest of the config leaves unused: a [classifier].path beside loader 'torchvision',
    a [tracing].sample_ratio without an endpoint. Not refused, as a file may keep them for
    another setting, but not silent: the reader may believe they are in force."""
    classifier = config.classifier
    # None for an unknown loader (a Config built in code goes unchecked): its load fails, naming it.
    reads = _LOADER_READS.get(classifier.loader)
    unused = [
        ([f"classifier.{f.name}" for f in dataclasses.fields(ClassifierSection) if f.name not in reads + _EVERY_LOADER_READS] if reads else [],
         f"by loader {classifier.loader!r} (its own keys: {', '.join(reads or ())})"),
        (["classifier.class_names_file"] if classifier.class_names else [], "while [classifier].class_names is set, which wins"),
        (["clip.illusion_epsilon"] if not (config.clip.path or config.clip.model) else [],
         "without a CLIP ([clip].path, or .model and .checkpoint), which CLIP-Illusion needs"),
        (["tracing.service_name", "tracing.sample_ratio"] if not config.tracing.otlp_endpoint else [],
         "without [tracing].otlp_endpoint: nothing is traced"),
        (list(_PER_CALLER_KEYS) if not config.server.callers_file else [],
         "without [server].callers_file: per-caller limits bound named callers, and no call has one"),
    ]
    warnings = []
    for keys, why in unused:
        if written := [key for key in keys if key in config.file_keys and _differs_from_default(config, key)]:
            named = [f"[{section}].{name}" for section, _, name in (key.partition(".") for key in written)]
            listed = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
            warnings.append(f"{config.source}: {listed} {'is' if len(named) == 1 else 'are'} ignored {why}")
    return warnings


def _differs_from_default(config: Config, key: str) -> bool:
    """Whether ``config``'s ``section.key`` is other than its section's default."""
    section, _, name = key.partition(".")
    values = getattr(config, section)
    return bool(getattr(values, name) != getattr(type(values)(), name))


def _validate(path: Path | str, config: Config) -> None:
    classifier = config.classifier
    if classifier.loader not in CLASSIFIER_LOADERS:
        raise ConfigError(f"{path}: [classifier].loader must be one of {_choices(CLASSIFIER_LOADERS)}, got {classifier.loader!r}")
    if problem := missing_classifier_key(classifier):
        raise ConfigError(f"{path}: {problem}")
    if config.runtime.backend not in BACKENDS:
        raise ConfigError(f"{path}: [runtime].backend must be one of {_choices(BACKENDS)}, got {config.runtime.backend!r}")
    _validate_device(path, config.runtime)
    if classifier.interpolation not in ("", *INTERPOLATIONS):
        raise ConfigError(f"{path}: [classifier].interpolation must be one of {_choices(INTERPOLATIONS)}, got {classifier.interpolation!r}")
    if len(classifier.mean) != len(classifier.std):
        raise ConfigError(f"{path}: [classifier].mean and .std must have the same length")
    if len(classifier.mean) not in (0, 1, 3):  # torch's "size of tensor a (3) must match ... b (2)" at load named neither
        raise ConfigError(f"{path}: [classifier].mean and .std must hold one value per channel of RGB images (3), or one for all, "
                          f"got {len(classifier.mean)}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in classifier.std):
        raise ConfigError(f"{path}: [classifier].std must hold positive numbers, got {list(classifier.std)}")
    for name in ("mean", "std"):  # (pixels - mean) / std: NaN or an infinity makes every prediction NaN or 0
        if not all(math.isfinite(v) for v in getattr(classifier, name)):
            raise ConfigError(f"{path}: [classifier].{name} must hold finite numbers, got {list(getattr(classifier, name))}")
    if any(v > 1 for v in classifier.mean):  # no channel of [0, 1] pixels averages above 1: 0-255 values served every image alike
        raise ConfigError(f"{path}: [classifier].mean holds values above 1, got {list(classifier.mean)}, but images reach the model "
                          "with pixels in [0, 1]: give mean and std on that scale (values for 0-255 pixels divided by 255, "
                          "e.g. 123.675 as 0.485)")
    for section_field in dataclasses.fields(config):
        values = getattr(config, section_field.name)
        for key_field in dataclasses.fields(values) if dataclasses.is_dataclass(values) else ():
            value = getattr(values, key_field.name)
            if isinstance(value, float) and math.isnan(value):  # it compares false with every limit
                raise ConfigError(f"{path}: [{section_field.name}].{key_field.name} must be a number, got nan")
    for least, keys in ((1, _AT_LEAST_ONE), (2, _AT_LEAST_TWO), (0, _NOT_NEGATIVE)):
        for key in keys:
            section, _, name = key.partition(".")
            value = getattr(getattr(config, section), name)
            if value is not None and value < least:
                raise ConfigError(f"{path}: [{section}].{name} must be at least {least}, got {value!r}")
    for key, most in _AT_MOST.items():
        section, _, name = key.partition(".")
        if (value := getattr(getattr(config, section), name)) is not None and value > most:
            raise ConfigError(f"{path}: [{section}].{name} must be at most {most}, got {value!r}")
    if problem := resize_size_problem(classifier.resize_size or 0, classifier.image_size):  # image_size 0, the model's: checked as it loads
        raise ConfigError(f"{path}: {problem}")
    if classifier.factory:
        try:
            parse_factory(classifier.factory)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
    clip = config.clip
    if clip.path and (clip.model or clip.checkpoint):
        raise ConfigError(f"{path}: set [clip].path (an open_clip directory) or [clip].model and .checkpoint, not both")
    if clip.checkpoint and not clip.model:
        raise ConfigError(f"{path}: [clip].checkpoint needs [clip].model, the open_clip architecture it is for (e.g. \"ViT-B-32\")")
    if clip.model and not clip.checkpoint:
        raise ConfigError(f"{path}: [clip].model needs [clip].checkpoint, its weights (a file, or an open_clip pretrained tag such as \"openai\")")
    try:  # a CLIP's recommended ε that cannot be used stops the start, not a visualisation
        clip.default_epsilon()
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if config.server.log_format not in LOG_FORMATS:
        raise ConfigError(f"{path}: [server].log_format must be one of {_choices(LOG_FORMATS)}, got {config.server.log_format!r}")
    if config.server.token and (problem := token_problem(config.server.token)):
        raise ConfigError(f"{path}: [server].token {problem}")
    server = config.server
    if bool(server.tls_cert_file) != bool(server.tls_key_file):
        raise ConfigError(f"{path}: set both [server].tls_cert_file and [server].tls_key_file, or neither")
    if server.tls_client_ca_file and not server.tls_cert_file:
        raise ConfigError(f"{path}: [server].tls_client_ca_file needs TLS: set [server].tls_cert_file and .tls_key_file too")
    if config.server.token and config.server.token_file:
        raise ConfigError(f"{path}: set one of [server].token and [server].token_file, not both")
    if server.callers_file and (server.token or server.token_file):
        both = "token" if server.token else "token_file"
        raise ConfigError(f"{path}: set [server].callers_file (named callers) or [server].{both} (one token), not both")
    if server.admins and not server.callers_file:
        raise ConfigError(f"{path}: [server].admins names callers of [server].callers_file; set that too")
    if bad := [name for name in server.admins if not CALLER_NAME.fullmatch(name)]:
        raise ConfigError(f"{path}: [server].admins: {bad[0][:64]!r} is no caller name (it must match {CALLER_NAME.pattern})")
    for name in ("port", "metrics_port", "health_port"):
        if getattr(config.server, name) > _MAX_PORT:
            raise ConfigError(f"{path}: [server].{name} must be at most {_MAX_PORT}, got {getattr(config.server, name)!r}")
    if not server.host.strip():  # an unset variable in `--host "$HOST"`: gRPC's bind failure would blame the port
        raise ConfigError(f"{path}: [server].host must be an address to listen on (127.0.0.1, or 0.0.0.0 for every interface), got {server.host!r}")
    unbracketed = server.host.removeprefix("[").removesuffix("]")
    if ":" in server.host and not _is_ipv6_address(unbracketed):
        # "0.0.0.0:50051" reached gRPC as "[0.0.0.0:50051]:50051", whose bind failure blamed another server using the port.
        raise ConfigError(f"{path}: [server].host must be an address without a port (that is [server].port), got {server.host!r}")
    if server.host != unbracketed and not (server.host == f"[{unbracketed}]" and _is_ipv6_address(unbracketed)):
        # "[::1" reached gRPC as "[::1:50051", "[127.0.0.1]" as "[127.0.0.1]:50051": each a bind failure blaming the port.
        raise ConfigError(f"{path}: [server].host takes brackets around a whole IPv6 address alone ([::1]), got {server.host!r}")
    if not server.data_dir.strip():  # it would be the working directory, whatever that is
        raise ConfigError(f"{path}: [server].data_dir must name a directory, got {server.data_dir!r}")
    taken: dict[int, str] = {}  # port -> the key that took it (0: any free port, or off)
    for name in ("port", "metrics_port", "health_port"):
        if (number := getattr(server, name)) in taken:
            raise ConfigError(f"{path}: [server].{taken[number]} and .{name} are both {number}; each needs a port of its own")
        if number:
            taken[number] = name
    tracing = config.tracing
    if tracing.otlp_endpoint and (problem := _endpoint_problem(tracing.otlp_endpoint)):
        raise ConfigError(f"{path}: [tracing].otlp_endpoint must be an OTLP/gRPC collector's URL, \"http://host:4317\" (plaintext) "
                          f"or \"https://host:4317\" (TLS), got {tracing.otlp_endpoint!r}: {problem}")
    if not tracing.service_name.strip():
        raise ConfigError(f"{path}: [tracing].service_name must name the service in traces, got {tracing.service_name!r}")
    if 0 < server.max_concurrent_rpcs < server.max_workers:  # threads no call could ever use
        raise ConfigError(f"{path}: [server].max_concurrent_rpcs ({server.max_concurrent_rpcs}) must be at least "
                          f"[server].max_workers ({server.max_workers})")
    batching = config.batching
    if batching.max_images_per_request > batching.max_queue_size:
        # A request larger than the queue could never be admitted: RESOURCE_EXHAUSTED forever.
        raise ConfigError(f"{path}: [batching].max_images_per_request ({batching.max_images_per_request}) must not "
                          f"exceed [batching].max_queue_size ({batching.max_queue_size})")

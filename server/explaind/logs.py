"""The server's log lines: text for people, or one JSON object per line for log pipelines
(Loki, Elasticsearch, Cloud Logging) that would otherwise parse the text with a regex."""

from __future__ import annotations

import contextvars
import ctypes
import importlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# The ``extra`` key of a record whose fields (name -> str) its JSON line carries as keys
# of their own, beside its message that names them too: a pipeline filters on them
# without parsing the message (the audit lines of explaind.service.audit, an operation's
# lines: explaind.jobs).
FIELDS = "fields"

# The fields every line logged in the current context carries besides its own (log_fields).
_CONTEXT_FIELDS: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("explaind_log_fields", default={})


@contextmanager
def log_fields(**fields: str) -> Iterator[None]:
    """While the block runs (in this thread), each JSON line carries ``fields`` as keys of
    their own, as a record's FIELDS do (which win over them): a job's ``operation_id`` and
    ``kind`` on every line its run logs (its traceback under an incident id, an engine's
    warning), which a log pipeline then joins to the operation without parsing messages."""
    token = _CONTEXT_FIELDS.set(fields)
    try:
        yield
    finally:
        _CONTEXT_FIELDS.reset(token)


class JsonFormatter(logging.Formatter):
    """``{"time": RFC 3339 UTC, "level", "logger", "message"[, the log_fields and
    FIELDS][, "trace_id", "span_id"][, "exception"]}`` per record; the ids (hex, as trace
    backends show them) of the span current in the thread that logs, when tracing
    (explaind.tracing) has one sampled: a call's or an operation's lines then lead to its
    trace, and back."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_CONTEXT_FIELDS.get(),
            **getattr(record, FIELDS, {}),
        }
        line.update(_current_span_ids())
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _current_span_ids() -> dict[str, str]:
    """``trace_id`` and ``span_id`` of the current sampled span; none without one, or when
    opentelemetry was never imported (tracing off: nothing to look up, nothing imported)."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return {}
    span = trace.get_current_span().get_span_context()
    if not (span.is_valid and span.trace_flags.sampled):
        return {}
    return {"trace_id": trace.format_trace_id(span.trace_id), "span_id": trace.format_span_id(span.span_id)}


# Set by configure_logging: the libraries' loggers are routed through the root handler only in a
# process whose logging explaind set up (a server), not in a script that loads models in-process.
_routing_libraries = False


def configure_logging(log_format: str) -> None:
    """A root handler on stderr in ``log_format`` (unless the process has one already),
    with our INFO lines and libraries' from WARNING (open_clip logs every load step at INFO).
    Python warnings (torch's deprecation of the TorchScript loader's torch.jit.load, say)
    become log lines too: printed as they are, they broke a JSON log's one object a line.
    Pillow's are left out, and so are the lines of Pillow's own loggers: they are about the
    image files callers send (a TIFF's corrupt EXIF, a size past Pillow's
    decompression-bomb limit, a TIFF of more samples per pixel than it decodes, which it
    logs at ERROR), which the call refuses or decodes anyway, so each would be a WARNING
    or ERROR line, with Pillow's path, for a caller's file rather than for anything the
    operator can fix. libtiff, which decodes Pillow's compressed TIFFs, is silenced too."""
    global _routing_libraries
    _routing_libraries = True
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", module=r"PIL\.")
    logging.getLogger("PIL").setLevel(logging.CRITICAL)
    _silence_libtiff()
    route_huggingface_loggers("huggingface_hub")  # diffusers and transformers: as a diffusion model loads, which imports them
    route_torch_loggers()
    logging.getLogger("explaind").setLevel(logging.INFO)


def route_huggingface_loggers(*libraries: str) -> None:
    """The lines of Hugging Face's ``libraries`` ("huggingface_hub", "diffusers",
    "transformers") go through the root handler alone: each puts a plain stderr handler of
    its own on its logger (its logging module's get_logger()), outside the log's format (a
    JSON log's one object a line). huggingface_hub's, which open_clip and diffusers download
    with, printed each warning (an offline download's retries) a second time; diffusers and
    transformers stop their lines there, so a Stable Diffusion load's ("You have disabled
    the safety checker") were plain lines alone. Each library's logging module is imported,
    as its first logger sets that handler up; one not installed is skipped. Only once
    :func:`configure_logging` ran: a script loading a model in-process keeps its own."""
    if not _routing_libraries:
        return
    for library in libraries:
        try:
            library_logging = importlib.import_module(f"{library}.utils.logging")
        except ImportError:  # a client without the server's dependencies, a server without the stable-diffusion extra
            continue
        root = library_logging.get_logger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.propagate = True


def route_torch_loggers() -> None:
    """torch puts a stderr handler of its own on each of its loggers (torch, torch.export,
    torch._dynamo, ...) and stops their lines there: a weights file the export loader could
    not read logged "W1207 07:50:14.036000 2931 torch/export/...] Unable to load package"
    outside the log's format (a JSON log's one object a line). Their lines go through the
    root handler alone; the loggers torch keeps quiet (no handler, no propagation) stay so.
    torch._logging.set_logs() puts torch's handlers back (a model factory may call it, to
    see dynamo's lines): the factory loader calls this again once the factory returns. Only
    once :func:`configure_logging` ran: a script's own set_logs() before a model load in
    process stays as it set it (its INFO lines were lost: no handler prints them)."""
    if not _routing_libraries:
        return
    try:
        importlib.import_module("torch")  # its import sets its loggers up
    except ImportError:  # a client without the server's dependencies
        return
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not (isinstance(logger, logging.Logger) and name.partition(".")[0] == "torch"):
            continue
        if own := [handler for handler in logger.handlers if getattr(handler, "stream", None) is sys.stderr]:
            for handler in own:
                logger.removeHandler(handler)
            logger.propagate = True


def _silence_libtiff() -> None:
    """Unset the error and warning handlers of the libtiff Pillow links, which print each
    message to stderr ("ZIPDecode: Decoding error at scanline 0, incorrect data check."):
    each is about a caller's TIFF, which Pillow then fails to decode (the call is
    INVALID_ARGUMENT), and came out as a line in no log format, breaking a JSON log. A
    Pillow built without libtiff has no such handlers."""
    try:
        from PIL import _imaging

        pillow = ctypes.CDLL(_imaging.__file__)  # its symbols include those of the libtiff it loaded
        for name in ("TIFFSetErrorHandler", "TIFFSetWarningHandler"):
            set_handler = getattr(pillow, name)
            set_handler.argtypes, set_handler.restype = [ctypes.c_void_p], ctypes.c_void_p
            set_handler(None)
    except (ImportError, OSError, AttributeError):
        pass

"""Who may call: the bearer token calls must carry (one, or one per named caller), and
the TLS credentials of the port.

Both may come from files ([server].token_file or .callers_file, .tls_cert_file,
.tls_key_file, .tls_client_ca_file) that are read again when they change, so a rotated secret or a
renewed certificate (Kubernetes swaps a mounted Secret's files in place; cert-manager
renews them) takes effect without a restart. A change that leaves a file unusable keeps
what was in force: a half-done rotation must not lock every caller out; nor is a token or
callers file taken while it is being rewritten in place (see SETTLE_S). A reload that
removes or changes a token revokes what it let in: calls it lets in from then on are
refused, and the streams already open with it end UNAUTHENTICATED (see :class:`Grant`).
"""

from __future__ import annotations

import base64
import contextvars
import datetime as dt
import hmac
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import grpc

from ..config import ConfigError, ServerSection, parse_callers, read_utf8_text, token_problem

log = logging.getLogger(__name__)

_Parsed = TypeVar("_Parsed")  # what a watched file's text is read as

# The authorization value's scheme and its space, compared lower-case.
_SCHEME = b"bearer "
# How often the files may be looked at for a change, in seconds.
RECHECK_INTERVAL_S = 1.0
# How long a changed token or callers file must keep its text before it is taken, in
# seconds: one rewritten in place (`cat > file`, an editor that empties it first) and read
# half-way may still parse, with a token cut short or callers left out, which would end
# their streams and refuse their calls until the next change.
SETTLE_S = 0.2


class _WatchedFiles:
    """Tells, at most once per RECHECK_INTERVAL_S, whether any of some files changed
    (by inode, size, modification or status change time, following links: a swapped-in
    file counts, and so does one rewritten at its size with its old modification time,
    as a copy that keeps times does), and logs why a reload failed once per reason."""

    def __init__(self, paths: Iterable[str], sleep: Callable[[float], None] = time.sleep) -> None:
        """``sleep``: waits the seconds it is given (see :meth:`settled_text`)."""
        self._paths = [path for path in paths if path]
        self._sleep = sleep
        self._lock = threading.Lock()
        self._reloading = threading.Lock()
        self._checked_at = time.monotonic()
        self._stamps: list[tuple[int, int, int, int] | None] | None = self._read_stamps()
        self._last_failure = ""

    def reload_failed(self, reason: str) -> None:
        """Look again at the next check even if nothing changes: a reload may have read
        the files half-way through a rotation (a new certificate, the old key)."""
        self._stamps = None
        if reason != self._last_failure:
            log.warning("%s; what was in force stays in force", reason)
            self._last_failure = reason

    def reloaded(self) -> None:
        self._last_failure = ""

    def settled_text(self, path: str) -> str:
        """``path``'s text, once it has kept it SETTLE_S: at once if nothing wrote the file
        (by its status change time) in the SETTLE_S before the read nor during it, else
        once it reads the same again SETTLE_S later. Raises OSError or UnicodeDecodeError,
        and ValueError if the text changed meanwhile: the file is being written, and is
        read again at the next check. Calls that check meanwhile wait (see
        :meth:`reload_if_changed`), so a file left unusable, read again at every check,
        must not make each of them wait."""
        before = os.stat(path)
        text = read_utf8_text(path)
        if time.time_ns() - before.st_ctime_ns >= SETTLE_S * 1e9 and _stamp(os.stat(path)) == _stamp(before):
            return text
        self._sleep(SETTLE_S)
        if read_utf8_text(path) != text:
            raise ValueError("changed while being read, so it is being written in place; "
                             "replace it whole instead (write another file, then rename it over this one)")
        return text

    def read(self, path: str, what: str, parse: Callable[[str], _Parsed]) -> _Parsed | None:
        """``parse`` of ``path``'s :meth:`settled_text`, or None once :meth:`reload_failed`
        has said why (``what`` names the file): it could not be read, or it or ``parse``
        raised ValueError."""
        try:
            return parse(self.settled_text(path))
        except (OSError, UnicodeDecodeError) as error:
            self.reload_failed(f"{what} {path} could not be read ({type(error).__name__})")
        except ValueError as error:
            self.reload_failed(f"{what} {path}: {error}")
        return None

    def reload_if_changed(self, reload: Callable[[], None]) -> None:
        """Run ``reload`` if the files changed, one reload at a time, each reading them after
        the one before: an earlier read, stalled past a later change, must not put back
        what that change removed (a revoked caller's token) once the later reload is done.
        A look while another thread reloads waits for it: what a call or stream checks
        after a change was seen is what that change left in force."""
        if not self._paths:  # a token from the config: nothing to wait for
            return
        with self._reloading:
            if self.changed():
                reload()

    def changed(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at < RECHECK_INTERVAL_S:
                return False
            self._checked_at = now
            stamps = self._read_stamps()
            changed, self._stamps = stamps != self._stamps, stamps
            return changed

    def _read_stamps(self) -> list[tuple[int, int, int, int] | None]:
        stamps = []
        for path in self._paths:
            try:
                status = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                stamps.append(_stamp(status))
        return stamps


def _stamp(status: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is replaced or written: inode, size, modification and
    status change times (ns)."""
    return status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


def _bearer_values(metadata: Iterable[tuple[str, str | bytes]] | None) -> list[bytes]:
    """What follows "Bearer " in the call's ``authorization`` metadata. The scheme's case
    does not matter (RFC 7235: "bearer" is "Bearer", as grpcurl -H or a hand-written
    header may send it)."""
    given = [value.encode() if isinstance(value, str) else value for key, value in metadata or () if key == "authorization"]
    return [value[len(_SCHEME):] for value in given if value[:len(_SCHEME)].lower() == _SCHEME]


# The caller of a grant that names none (no auth, or the one token).
UNNAMED = ""
# The named caller of the call this thread serves (None: none), set by the interceptor
# for the servicers, which hand it to the engine as a plain ``caller`` argument.
_CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("explaind_caller", default=None)


def current_caller() -> str | None:
    """The named caller of the call being served; None without named callers."""
    return _CALLER.get()


@contextmanager
def calling_as(caller: str | None) -> Iterator[None]:
    """Make ``caller`` the :func:`current_caller` while the block runs."""
    token = _CALLER.set(caller)
    try:
        yield
    finally:
        _CALLER.reset(token)


class Grant:
    """What one token let a call do: act as ``caller`` (UNNAMED for the one token). It
    holds while its source (BearerToken, NamedCallers) keeps this very object: a reload
    that removes the caller or changes its token makes a new one, or none. A call keeps
    the grant it was let in with, so a reload racing its check still reaches it; the
    interceptor ends a stream whose grant no longer holds (a unary call already in
    progress finishes)."""

    __slots__ = ("caller", "token")

    def __init__(self, caller: str, token: bytes) -> None:
        self.caller = caller
        self.token = token

    def __repr__(self) -> str:  # never the token: it may end up in a log line
        return f"Grant(caller={self.caller!r})"

    @property
    def revocation(self) -> str:
        """What a call let in with this grant is told once it no longer holds."""
        if self.caller:
            return f"caller {self.caller!r} was removed or its token changed ([server].callers_file); call again with a current token"
        return "the bearer token this call was made with was replaced ([server].token_file); call again with the new token"


class BearerToken:
    def __init__(self, token: str, path: str = "", sleep: Callable[[float], None] = time.sleep) -> None:
        """``token`` is the current one ("" = no auth), already read from ``path`` if any;
        ``sleep`` waits a reload's SETTLE_S."""
        self._grant = Grant(UNNAMED, token.encode())
        self._path = path
        self._files = _WatchedFiles([path], sleep)

    def grant_of(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Grant | None:
        """The token's grant (caller UNNAMED) for a call whose metadata carries it and no
        other bearer token (a stale one sent beside it is a client's mistake, which a
        server taking the first value only would answer by their order), else None; each
        compared in constant time (a caller cannot guess it from how long a refusal takes)."""
        self._files.reload_if_changed(self._reload)
        grant = self._grant
        if not grant.token:
            return grant
        matches = [hmac.compare_digest(value, grant.token) for value in _bearer_values(metadata)]
        return grant if matches and all(matches) else None

    def in_force(self, grant: Grant) -> bool:
        """Whether ``grant`` still holds, the file read again first if it changed: an open
        stream asks between messages, so no other call is needed for a new token to end it."""
        self._files.reload_if_changed(self._reload)
        return grant is self._grant

    def _reload(self) -> None:
        token = self._files.read(self._path, "token file", str.strip)
        if token is None:
            return
        if problem := token_problem(token):
            self._files.reload_failed(f"token file {self._path} {problem}")
            return
        self._files.reloaded()
        if token.encode() != self._grant.token:
            self._grant = Grant(UNNAMED, token.encode())
            log.info("token file %s changed; calls now need the new token, and streams opened with the old one end", self._path)


class NamedCallers:
    """The callers of [server].callers_file, each known by its own bearer token; the file
    is read again when it changes, as a token file is (a file left unusable keeps the
    callers that were in force). An admin of ``admins`` missing from a reloaded file is
    logged once and has no rights until it is back: it cannot call without a token."""

    def __init__(self, callers: dict[str, str], path: str, admins: tuple[str, ...] = (),
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """``callers``: name -> token, already read from ``path``; ``sleep`` waits a
        reload's SETTLE_S."""
        self._grants = {name: Grant(name, token.encode()) for name, token in callers.items()}
        self._path = path
        self._admins = admins
        self._files = _WatchedFiles([path], sleep)
        self._missing_admins: list[str] = []

    def grant_of(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Grant | None:
        """The grant of the caller whose token the call carries (None: none does, or the
        call carries another bearer token too: another caller's would make it either of
        them, and an unknown one may be a removed caller's, or a stale token of its own).
        Every token is compared, each in constant time: how long the answer takes tells
        nothing of which token, or how much of one, matched."""
        self._files.reload_if_changed(self._reload)
        grants = self._grants.values()
        matched = [{grant for grant in grants if hmac.compare_digest(value, grant.token)} for value in _bearer_values(metadata)]
        found = set().union(*matched)
        return found.pop() if len(found) == 1 and all(matched) else None

    def in_force(self, grant: Grant) -> bool:
        """Whether ``grant`` still holds, the file read again first if it changed: an open
        stream asks between messages, so no other call is needed for a revocation to end it."""
        self._files.reload_if_changed(self._reload)
        return self._grants.get(grant.caller) is grant

    def _reload(self) -> None:
        callers = self._files.read(self._path, "callers file", parse_callers)
        if callers is None:
            return
        self._files.reloaded()
        tokens = {name: token.encode() for name, token in callers.items()}
        if tokens != {name: grant.token for name, grant in self._grants.items()}:
            # A caller keeps its grant, and its streams, while its token stays as it was.
            kept = {name: grant for name, grant in self._grants.items() if tokens.get(name) == grant.token}
            added, removed = sorted(tokens.keys() - self._grants.keys()), sorted(self._grants.keys() - tokens.keys())
            changed = sorted(self._grants.keys() - kept.keys() - set(removed))
            self._grants = {name: kept.get(name) or Grant(name, token) for name, token in tokens.items()}
            log.info("callers file %s changed; %d caller(s) now (added: %s; removed: %s; new token: %s)", self._path, len(tokens),
                     ", ".join(added) or "none", ", ".join(removed) or "none", ", ".join(changed) or "none")
        missing = [name for name in self._admins if name not in tokens]
        if missing and missing != self._missing_admins:
            log.warning("callers file %s lacks admin(s) %s of [server].admins; ignored until they are back", self._path, ", ".join(missing))
        self._missing_admins = missing


class TlsCredentials:
    """The port's TLS certificate, key and (for mutual TLS) client CA, from PEM files.
    Raises ConfigError when they cannot be read at start-up."""

    def __init__(self, settings: ServerSection) -> None:
        self._cert_file, self._key_file, self._ca_file = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        self._files = _WatchedFiles([self._cert_file, self._key_file, self._ca_file])
        self._initial = self._configuration()  # ConfigError now; later failures keep the old files

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials gRPC asks on each new connection whether the files have changed."""
        return grpc.dynamic_ssl_server_credentials(self._initial, self._fetch, require_client_authentication=bool(self._ca_file))

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        if not self._files.changed():
            return None
        try:
            configuration = self._configuration()
        except ConfigError as error:
            self._files.reload_failed(str(error))
            return None
        self._files.reloaded()
        log.info("TLS files changed (%s); new connections use them", self._cert_file)
        return configuration

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        """The files as gRPC takes them, once they hold a certificate and its own key
        (gRPC would refuse a mismatched pair at the handshake, or at start-up as a port
        it cannot bind)."""
        key, chain = _pem(self._key_file, "tls_key_file", "PRIVATE KEY"), _pem(self._cert_file, "tls_cert_file", "CERTIFICATE")
        client_ca = _pem(self._ca_file, "tls_client_ca_file", "CERTIFICATE") if self._ca_file else None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self._cert_file, self._key_file, password=lambda: b"")  # an encrypted key fails here
        except (ssl.SSLError, OSError) as error:
            raise ConfigError(f"[server].tls_key_file: {self._key_file} is not an unencrypted private key of the certificate in "
                              f"{self._cert_file} ({getattr(error, 'reason', None) or error})") from None
        if (Path(self._key_file).read_bytes(), Path(self._cert_file).read_bytes()) != (key, chain):
            raise ConfigError(f"[server].tls_cert_file: {self._cert_file} changed while being read")
        # Every client would refuse it ("certificate has expired"), so it is no renewal either.
        try:
            not_before, not_after = certificate_validity(chain)
        except (ValueError, IndexError) as error:  # OpenSSL took it; a form this reader does not know
            raise ConfigError(f"[server].tls_cert_file: cannot read the validity of the certificate in {self._cert_file} ({error})") from None
        now = dt.datetime.now(dt.timezone.utc)
        if not not_before <= now <= not_after:
            when = f"expired at {not_after:%Y-%m-%d %H:%M:%S} UTC" if now > not_after else f"is valid from {not_before:%Y-%m-%d %H:%M:%S} UTC only"
            raise ConfigError(f"[server].tls_cert_file: the certificate in {self._cert_file} {when}")
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=client_ca)


_CERTIFICATE_BLOCK = re.compile(r"-----BEGIN (?:X509 )?CERTIFICATE-----(.*?)-----END (?:X509 )?CERTIFICATE-----", re.DOTALL)


def certificate_validity(chain: bytes) -> tuple[dt.datetime, dt.datetime]:
    """(notBefore, notAfter), in UTC, of the first certificate of a PEM chain: the
    Certificate's tbsCertificate holds, after an optional [0] version, the serial number,
    the signature algorithm and the issuer, then Validity (RFC 5280, 4.1). Read from the
    DER here: the standard library parses no certificate it does not verify. The block's
    label is one gRPC serves: CERTIFICATE, or X509 CERTIFICATE (the old one); OpenSSL also
    reads TRUSTED CERTIFICATE, which gRPC refuses (it could not bind the port)."""
    block = _CERTIFICATE_BLOCK.search(chain.decode("ascii", "replace"))
    if block is None:
        raise ValueError("no PEM block labelled CERTIFICATE or X509 CERTIFICATE, the forms gRPC serves")
    der = base64.b64decode("".join(block.group(1).split()))

    def element(data: bytes, at: int) -> tuple[int, bytes, int]:
        """(tag, contents, offset after) of the DER element at ``at``."""
        tag, length, at = data[at], data[at + 1], at + 2
        if length & 0x80:  # long form: the next length & 0x7F bytes hold it
            size = length & 0x7F
            length, at = int.from_bytes(data[at:at + size], "big"), at + size
        return tag, data[at:at + length], at + length

    _, certificate, _ = element(der, 0)
    _, tbs, _ = element(certificate, 0)
    at = 0
    if tbs[0] == 0xA0:  # [0] EXPLICIT version
        at = element(tbs, at)[2]
    for _ in range(3):  # serialNumber, signature, issuer
        at = element(tbs, at)[2]
    _, validity, _ = element(tbs, at)
    times = []
    at = 0
    for _ in range(2):
        tag, value, at = element(validity, at)
        text = value.decode("ascii")
        if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ: years 1950-2049
            text = ("19" if int(text[:2]) >= 50 else "20") + text
        times.append(dt.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.timezone.utc))
    return times[0], times[1]


def _pem(path: str, key: str, kind: str) -> bytes:
    """A PEM file's bytes; ConfigError naming the [server] key when it is unreadable or
    holds no ``kind`` block (gRPC would only fail later, at each handshake)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"[server].{key}: cannot read {path}: {error.strerror}") from None
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise ConfigError(f"[server].{key}: {path} holds no PEM {kind}")
    return data

"""gRPC over TLS and mutual TLS: the server answers only clients that trust its
certificate (and, with a client CA, present one it signed), picks up a renewed
certificate without a restart, and refuses unusable files in one line."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import pickle
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import StoppedClock, free_port
from explaind.client import Client, ExplaindError, UnavailableError
from explaind.client.cli import main
from explaind.config import ConfigError, default_config
from explaind.service import ExplaindServer, auth


class Authority:
    """A throwaway CA that writes PEM files: itself, and certificates it signs for
    127.0.0.1 / localhost."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory, self.name = directory, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = self._sign(subject, self.key.public_key(), ca=True)
        self.file = self._write(f"{name}-ca.pem", self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
              valid: tuple[dt.timedelta, dt.timedelta] = (-dt.timedelta(minutes=5), dt.timedelta(days=1))) -> tuple[Path, Path]:
        """(certificate file, key file) of a leaf certificate for ``name``, for ``hosts``
        (IP addresses or DNS names), valid from now + valid[0] to now + valid[1]."""
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = self._sign(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key(), ca=False,
                                 hosts=hosts, valid=valid)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return (self._write(f"{name}.pem", certificate.public_bytes(serialization.Encoding.PEM)),
                self._write(f"{name}.key", key_pem))

    def _sign(self, subject: x509.Name, public_key, *, ca: bool, hosts: tuple[str, ...] = (),
              valid: tuple[dt.timedelta, dt.timedelta] = (-dt.timedelta(minutes=5), dt.timedelta(days=1))) -> x509.Certificate:
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        builder = (x509.CertificateBuilder().subject_name(subject).public_key(public_key)
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)]))
                   .serial_number(x509.random_serial_number()).not_valid_before(now + valid[0])
                   .not_valid_after(now + valid[1])
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            names = [x509.IPAddress(ipaddress.ip_address(host)) if host[0].isdigit() else x509.DNSName(host) for host in hosts]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def _write(self, name: str, data: bytes) -> Path:
        path = self.directory / f"{self.name}-{name}"
        path.write_bytes(data)
        return path


def tls_server(tmp_path: Path, classifier_dir: Path, cert: Path, key: Path, client_ca: Path | None = None,
               health_port: int = 0) -> ExplaindServer:
    config = default_config().replace("classifier", path=str(classifier_dir)).replace(
        "server", port=0, data_dir=str(tmp_path / "data"), tls_cert_file=str(cert), tls_key_file=str(key),
        tls_client_ca_file=str(client_ca or ""), health_port=health_port)
    server = ExplaindServer(config)
    server.start()
    server.load_models()
    return server


def answers(target: str, **credentials) -> bool:
    """Whether a new connection with these credentials gets a model's metadata."""
    try:
        with Client(target, timeout=5, **credentials) as client:
            return client.model_metadata().feature_dim == 128
    except UnavailableError:  # the handshake failed
        return False


@pytest.mark.parametrize(("host", "tls", "warned"), [("0.0.0.0", False, True), ("127.0.0.1", False, False), ("localhost", False, False),
                                                        ("0.0.0.0", True, False), ("::1", False, False), ("[::1]", False, False)])
def test_a_server_taking_tokens_in_plaintext_beyond_loopback_says_so(tmp_path, classifier_dir, caplog, host, tls, warned):
    # Callers' tokens crossed the network readable by anyone on the path, and nothing said so.
    from explaind.service.server import serve

    certificate, key = Authority(tmp_path, "ca").issue("server") if tls else ("", "")
    config = default_config().replace("classifier", path=str(classifier_dir)).replace(
        "server", host=host, port=0, metrics_port=0, data_dir=str(tmp_path / "data"), token="s3cret",
        tls_cert_file=str(certificate), tls_key_file=str(key))
    stop = threading.Event()
    with caplog.at_level(logging.INFO, logger="explaind"):
        serving = threading.Thread(target=serve, args=(config, stop))
        serving.start()
        deadline = time.monotonic() + 60
        while "listening on" not in caplog.text and serving.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        serving.join(60)
    # The address as a client dials it: an IPv6 one in brackets, then the port.
    assert re.search(rf"listening on {re.escape({'::1': '[::1]'}.get(host, host))}:[0-9]+\b", caplog.text), caplog.text
    plaintext = [record.getMessage() for record in caplog.records if "in plaintext" in record.getMessage()]
    assert len(plaintext) == warned and all(re.fullmatch(
        r"callers' tokens reach 0\.0\.0\.0:\d+ in plaintext: serve with TLS \(\[server\]\.tls_cert_file\), "
        r"or behind a proxy or service mesh that terminates it", message) for message in plaintext), plaintext
    assert "s3cret" not in caplog.text


@pytest.mark.parametrize(("host", "loopback"), [("localhost", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("0.0.0.0", False), ("::", False),
                                                ("::ffff:127.0.0.1", True), ("::ffff:10.0.0.7", False), ("explaind.internal", False),
                                                # RFC 6761: names under .localhost are loopback, as the SDK held and the server did not.
                                                ("api.localhost", True), ("LocalHost", True), ("localhost.", True),
                                                ("localhost.example.com", False), ("notlocalhost", False)])
def test_only_loopback_addresses_count_as_taking_connections_from_this_machine_alone(host, loopback):
    # A host name other than localhost may resolve to any address: its callers' tokens
    # may cross the network, so the plaintext warning is due. The server and the SDK share the rule.
    from explaind.client._client import _is_local_target
    from explaind.loopback import is_loopback_host

    assert is_loopback_host(host) is loopback
    assert _is_local_target(f"[{host.strip('[]')}]:50051" if ":" in host else f"{host}:50051") is loopback


def test_a_certificate_in_the_older_x509_certificate_pem_form_is_served_and_a_trusted_certificate_refused(tmp_path, classifier_dir):
    # gRPC serves a "BEGIN X509 CERTIFICATE" block (the old label), which the validity
    # check, looking for "BEGIN CERTIFICATE" alone, refused as "cannot read the validity
    # ... (list index out of range)". A "TRUSTED CERTIFICATE", which OpenSSL reads and
    # gRPC does not, is refused before the bind, where it would read as a port in use.
    authority = Authority(tmp_path, "ca")
    cert, key = authority.issue("server")
    pem = cert.read_text()
    cert.write_text(pem.replace("BEGIN CERTIFICATE", "BEGIN X509 CERTIFICATE").replace("END CERTIFICATE", "END X509 CERTIFICATE"))
    server = tls_server(tmp_path, classifier_dir, cert, key)
    try:
        assert answers(f"127.0.0.1:{server.port}", root_certificates=authority.file)
    finally:
        server.stop(0)
    cert.write_text(pem.replace("BEGIN CERTIFICATE", "BEGIN TRUSTED CERTIFICATE").replace("END CERTIFICATE", "END TRUSTED CERTIFICATE"))
    with pytest.raises(ConfigError, match=re.escape(f"[server].tls_cert_file: cannot read the validity of the certificate in {cert} "
                                                    "(no PEM block labelled CERTIFICATE or X509 CERTIFICATE, the forms gRPC serves)")):
        ExplaindServer(default_config().replace("server", data_dir=str(tmp_path / "data"), tls_cert_file=str(cert), tls_key_file=str(key)))


def test_a_tls_server_answers_only_clients_that_trust_its_certificate(tmp_path, classifier_dir, capsys):
    authority = Authority(tmp_path, "ca")
    server = tls_server(tmp_path, classifier_dir, *authority.issue("server"))
    target = f"127.0.0.1:{server.port}"
    try:
        assert answers(target, root_certificates=authority.file)
        assert answers(f"localhost:{server.port}", root_certificates=str(authority.file))
        assert not answers(target)  # plaintext
        assert not answers(target, tls=True)  # the system's CAs never signed it
        assert not answers(target, root_certificates=Authority(tmp_path, "other").file)
        assert main(["--target", target, "--ca-file", str(authority.file), "info"]) == 0
        assert "classes" in capsys.readouterr().out
        # The CLI says what to check: --tls, or the CA.
        assert main(["--target", target, "--timeout", "5", "info"]) == 1
        assert f"\n  (if {target} serves TLS, add --tls (and --ca-file for a private CA))\n" in capsys.readouterr().err
        assert main(["--target", target, "--timeout", "5", "--tls", "info"]) == 1
        assert f"\n  (the certificate of {target} is not signed by a CA this client trusts: --ca-file names the CA that signed it)\n" \
            in capsys.readouterr().err
    finally:
        server.stop(0)


def test_mutual_tls_asks_every_client_for_a_certificate_its_ca_signed(tmp_path, classifier_dir):
    servers, clients, strangers = Authority(tmp_path, "servers"), Authority(tmp_path, "clients"), Authority(tmp_path, "strangers")
    server = tls_server(tmp_path, classifier_dir, *servers.issue("server"), client_ca=clients.file)
    target = f"127.0.0.1:{server.port}"
    try:
        cert, key = clients.issue("analyst")
        assert answers(target, root_certificates=servers.file, certificate_chain=cert, private_key=key)
        assert not answers(target, root_certificates=servers.file)
        stranger_cert, stranger_key = strangers.issue("analyst")
        assert not answers(target, root_certificates=servers.file, certificate_chain=stranger_cert, private_key=stranger_key)
    finally:
        server.stop(0)


def test_a_pickled_mutual_tls_client_carries_its_files_paths_not_their_contents(tmp_path, classifier_dir, monkeypatch):
    # For a spawn pool: the pickle holds the PEM files' absolute paths, read again where it
    # is unpickled, so a relative path given in one working directory serves in another.
    servers, clients = Authority(tmp_path, "servers"), Authority(tmp_path, "clients")
    server = tls_server(tmp_path, classifier_dir, *servers.issue("server"), client_ca=clients.file)
    cert, key = clients.issue("analyst")
    monkeypatch.chdir(tmp_path)
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=5, root_certificates=servers.file.name, certificate_chain=cert.name,
                    private_key=key.name) as client:
            pickled = pickle.dumps(client)
        assert key.read_bytes() not in pickled and str(key).encode() in pickled
        monkeypatch.chdir(tmp_path / "data")
        with pickle.loads(pickled) as copy:
            assert copy.model_metadata().feature_dim == 128
    finally:
        server.stop(0)


def test_a_closed_tls_client_unpickles_closed_after_its_files_are_gone(tmp_path):
    # The error of a late result holds its client, closed: unpickling it read the PEM files
    # again, and where they were gone (rotated, a worker's temporary copy) the pool's caller
    # got the unpickling's error, not the one raised.
    authority = Authority(tmp_path, "clients")
    cert, key = authority.issue("analyst")
    client = Client("127.0.0.1:1", root_certificates=authority.file, certificate_chain=cert, private_key=key)
    client.close()
    pickled = pickle.dumps(client)
    key.unlink()
    with pytest.raises(ValueError, match=r"this Client of 127\.0\.0\.1:1 is closed"):
        pickle.loads(pickled).model_metadata()


def test_each_tls_failure_says_what_to_check(tmp_path, classifier_dir, capsys):
    # An expired certificate read as an unknown CA, and a wrong host name or a refused
    # client certificate got no hint; a CA file holding a key, or a key of another
    # certificate, failed every connection with "Failed to create security handshaker".
    servers, clients = Authority(tmp_path, "servers"), Authority(tmp_path, "clients")
    ca = ["--ca-file", str(servers.file), "--timeout", "5"]

    def hint(target: str, *argv: str) -> str:
        assert main(["--target", target, *argv, "info"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.splitlines()) == 2, err
        return err.splitlines()[1]

    for cert_and_key, target, expected in (
        # Valid for 3 s: a server refuses to start with an expired certificate, not to go on with one.
        (servers.issue("expiring", valid=(-dt.timedelta(minutes=5), dt.timedelta(seconds=3))), "127.0.0.1",
         "is outside its validity period: its operator must renew it, unless this machine's clock is wrong)"),
        (servers.issue("elsewhere", hosts=("elsewhere.example",)), "localhost", "does not list the host --target names: name one "
                                                                                "it lists)"),
    ):
        server = tls_server(tmp_path, classifier_dir, *cert_and_key)
        try:
            if target == "127.0.0.1":  # past the expiring one's end
                not_after = x509.load_pem_x509_certificate(cert_and_key[0].read_bytes()).not_valid_after_utc.timestamp()
                time.sleep(max(0.0, not_after + 1.1 - time.time()))
            assert hint(f"{target}:{server.port}", *ca) == f"  (the certificate of {target}:{server.port} {expected}"
        finally:
            server.stop(0)
    server = tls_server(tmp_path, classifier_dir, *servers.issue("server"), client_ca=clients.file)
    target = f"127.0.0.1:{server.port}"
    try:
        assert hint(target, *ca) == (f"  (if {target} asks for a client certificate (mutual TLS), --cert-file and --key-file "
                                     "name one its CA signed)")
        stranger_cert, stranger_key = Authority(tmp_path, "strangers").issue("analyst")
        assert hint(target, *ca, "--cert-file", str(stranger_cert), "--key-file", str(stranger_key)) == (
            f"  ({target} refused the client certificate of --cert-file: is it signed by the CA the server trusts, and valid?)")
        cert, key = clients.issue("analyst")
        _, other_key = clients.issue("other")
        assert main(["--target", target, *ca, "--cert-file", str(cert), "--key-file", str(other_key), "info"]) == 1
        assert capsys.readouterr().err.startswith(f"error: --key-file: {other_key} is not an unencrypted private key of the "
                                                  f"certificate in {cert} (KEY_VALUES_MISMATCH)")
        assert main(["--target", target, "--ca-file", str(key), "--cert-file", str(cert), "--key-file", str(key), "info"]) == 1
        assert capsys.readouterr().err == f"error: --ca-file: {key} holds no PEM certificate\n"
        assert main(["--target", target, *ca, "--cert-file", str(cert), "--key-file", str(key), "info"]) == 0
        # A bundle's comments may be UTF-8 (curl's cacert.pem names issuers so): a TypeError traceback once.
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes("# Issuer: CN=Főtanúsítvány\n".encode() + servers.file.read_bytes())
        assert main(["--target", target, "--ca-file", str(bundle), "--cert-file", str(cert), "--key-file", str(key), "info"]) == 0
    finally:
        server.stop(0)


def test_the_health_port_tells_plaintext_probes_whether_a_mutual_tls_server_serves_and_nothing_else(tmp_path, classifier_dir):
    servers, clients = Authority(tmp_path, "servers"), Authority(tmp_path, "clients")
    health_port = free_port()
    server = tls_server(tmp_path, classifier_dir, *servers.issue("server"), client_ca=clients.file, health_port=health_port)
    assert server.health_port == health_port
    try:
        with Client(f"127.0.0.1:{health_port}", timeout=5) as probe:
            assert probe.health() == "SERVING"
            with pytest.raises(ExplaindError, match="UNIMPLEMENTED|not implemented|Method not found"):
                probe.model_metadata()  # the classifier stays behind mutual TLS
        assert not answers(f"127.0.0.1:{server.port}", root_certificates=servers.file)
    finally:
        server.stop(0)
    with Client(f"127.0.0.1:{health_port}", timeout=5) as probe, pytest.raises(UnavailableError):
        probe.health()  # stopped with the server


def test_health_methods_no_one_serves_are_unimplemented_without_a_logged_traceback(tmp_path, classifier_dir, caplog):
    # Each call to health's List (either port) or Watch (the probe port) logged a 1 KB
    # ERROR traceback: anyone, without a token, could fill the log and page on-call.
    import logging

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    config = default_config().replace("classifier", path=str(classifier_dir)).replace(
        "server", port=0, data_dir=str(tmp_path / "data"), health_port=free_port())
    server = ExplaindServer(config)
    server.start()
    caplog.set_level(logging.ERROR)
    try:
        for port in (server.port, server.health_port):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                calls = [lambda: stub.List(health_pb2.HealthListRequest(), timeout=5)]
                if port == server.health_port:
                    calls.append(lambda: next(stub.Watch(health_pb2.HealthCheckRequest(), timeout=5)))
                for call in calls * 3:
                    with pytest.raises(grpc.RpcError) as refused:
                        call()
                    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(0)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR], caplog.text


def test_callers_without_a_token_get_a_quarter_of_the_stream_slots(tmp_path, classifier_dir):
    # Health's Watch needs no token and took the same slots as WatchOperation: 32 idle
    # public streams left the callers with a token none.
    import grpc
    from google.protobuf import empty_pb2
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from explaind.v1 import operations_pb2, operations_pb2_grpc

    config = default_config().replace("classifier", path=str(classifier_dir)).replace(
        "server", port=0, data_dir=str(tmp_path / "data"), max_workers=16, token="s3cret")  # 8 slots, 2 of them public
    server = ExplaindServer(config)
    server.start()
    job = server.engine.jobs.submit("quick", lambda ctx: empty_pb2.Empty()).record.job_id
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        public = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(2)]
        for stream in public:
            next(stream)
        with pytest.raises(grpc.RpcError) as refused:
            next(health.Watch(health_pb2.HealthCheckRequest(), timeout=5))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 of them for calls without a token" in refused.value.details()
        watch = operations_pb2_grpc.OperationsServiceStub(channel).WatchOperation(
            operations_pb2.WatchOperationRequest(name=f"operations/{job}"), timeout=10, metadata=(("authorization", "Bearer s3cret"),))
        assert next(watch).operation.name == f"operations/{job}"  # a caller with the token still has slots
        for stream in public:
            stream.cancel()
    finally:
        channel.close()
        server.stop(0)


def test_open_streams_never_starve_the_probes_or_the_shutdown(tmp_path, classifier_dir):
    # Each open stream holds a worker thread, and health's Watch needs no token: two idle
    # Watch streams silenced the health port's two threads, so kubelet's probes timed out.
    import threading

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    config = default_config().replace("classifier", path=str(classifier_dir)).replace(
        "server", port=0, data_dir=str(tmp_path / "data"), health_port=free_port(), max_workers=2)
    server = ExplaindServer(config)
    server.start()
    server.load_models()
    main, probe = grpc.insecure_channel(f"127.0.0.1:{server.port}"), grpc.insecure_channel(f"127.0.0.1:{server.health_port}")
    request, serving = health_pb2.HealthCheckRequest(), health_pb2.HealthCheckResponse.SERVING
    try:
        with pytest.raises(grpc.RpcError) as refused:  # the probe port answers Check only
            next(health_pb2_grpc.HealthStub(probe).Watch(request, timeout=5))
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # max_workers 2: one stream at a time; a second is refused, and calls still get a thread.
        first = health_pb2_grpc.HealthStub(main).Watch(request, timeout=60)
        assert next(first).status == serving
        with pytest.raises(grpc.RpcError) as refused:
            next(health_pb2_grpc.HealthStub(main).Watch(request, timeout=5))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for channel in (main, probe):
            assert health_pb2_grpc.HealthStub(channel).Check(request, timeout=3).status == serving
        first.cancel()
        deadline = time.monotonic() + 10
        while True:  # the slot comes back once the cancelled stream has ended on the server
            try:
                second = health_pb2_grpc.HealthStub(main).Watch(request, timeout=60)
                assert next(second).status == serving
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.1)
        # Shutting down with a stream open (and one just cancelled) ends.
        second.cancel()
        third = health_pb2_grpc.HealthStub(main).Watch(request, timeout=60)
        stopper = threading.Thread(target=server.stop, args=(0,))
        stopper.start()
        stopper.join(30)
        assert not stopper.is_alive(), "stop() hung on an open Watch stream"
        third.cancel()
    finally:
        main.close()
        probe.close()
        server.stop(0)


def test_a_port_that_cannot_be_bound_frees_the_ones_already_bound(tmp_path, classifier_dir):
    import socket

    port, metrics_port = free_port(), free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = default_config().replace("classifier", path=str(classifier_dir)).replace(
            "server", port=port, metrics_port=metrics_port, health_port=busy.getsockname()[1], data_dir=str(tmp_path / "data"))
        server = ExplaindServer(config)
        with pytest.raises(OSError, match="cannot bind health"):
            server.start()
        server.store.close()
    for freed in (port, metrics_port):
        with socket.socket() as again:
            again.bind(("127.0.0.1", freed))  # OSError (address in use) if the failed start kept it


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_host_serves_grpc_health_and_metrics_written_with_or_without_brackets(tmp_path, classifier_dir, host):
    # "::1" reached gRPC as "::1:PORT", which it cannot bind ("is another server using the port?"), and "[::1]"
    # reached /metrics' getaddrinfo, which cannot resolve it: neither spelling of an IPv6 host started.
    import socket
    import urllib.request

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    config = default_config().replace("classifier", path=str(classifier_dir)).replace(
        "server", host=host, port=0, metrics_port=free_port(), health_port=free_port(), data_dir=str(tmp_path / "data"))
    server = ExplaindServer(config)
    try:
        port = server.start()
        for bound in (port, server.health_port):
            with Client(f"[::1]:{bound}", timeout=10) as client:
                assert client.health() == "NOT_SERVING"  # answered: the models are not loaded
        assert urllib.request.urlopen(f"http://[::1]:{server.metrics_port}/metrics", timeout=10).status == 200
    finally:
        server.stop(0)


def test_a_stopped_server_closes_its_metrics_socket_itself_and_frees_the_port(tmp_path, classifier_dir):
    # Closed by stop(), not left to the garbage collector: an embedding process's tests
    # (ResourceWarning as an error) and a PyPy or a held reference would keep the port.
    import socket
    import warnings

    metrics_port = free_port()
    config = default_config().replace("classifier", path=str(classifier_dir)).replace(
        "server", port=0, metrics_port=metrics_port, data_dir=str(tmp_path / "data"))
    server = ExplaindServer(config)
    server.start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        server.stop(0)
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    with socket.socket() as again:
        again.bind(("127.0.0.1", metrics_port))


def test_a_renewed_certificate_serves_new_connections_without_a_restart(tmp_path, classifier_dir, caplog):
    # A mounted Kubernetes Secret: tls.crt -> ..data/tls.crt, ..data -> ..v1, and a renewal
    # swaps the ..data link to a new folder in one step.
    secret = tmp_path / "secret"
    old, new, third = Authority(tmp_path, "old"), Authority(tmp_path, "new"), Authority(tmp_path, "third")

    def mount(version: str, authority: Authority) -> None:
        (secret / version).mkdir(parents=True)
        for name, source in zip(("tls.crt", "tls.key"), authority.issue("server")):
            os.replace(source, secret / version / name)
        (secret / "..data.new").symlink_to(version)
        os.replace(secret / "..data.new", secret / "..data")

    mount("..v1", old)
    for name in ("tls.crt", "tls.key"):
        (secret / name).symlink_to(Path("..data") / name)
    server = tls_server(tmp_path, classifier_dir, secret / "tls.crt", secret / "tls.key")
    target = f"127.0.0.1:{server.port}"

    def switches_to(authority: Authority) -> bool:
        deadline = time.monotonic() + 15
        while not answers(target, root_certificates=authority.file) and time.monotonic() < deadline:
            time.sleep(0.2)
        return answers(target, root_certificates=authority.file)

    def keeps(authority: Authority, until_logged: str) -> bool:
        """Whether the server answers with ``authority`` on every new connection (each makes
        it look at its files, at most once a second) until it logs ``until_logged``."""
        deadline = time.monotonic() + 15
        while until_logged not in caplog.text and time.monotonic() < deadline:
            if not answers(target, root_certificates=authority.file):
                return False
            time.sleep(0.2)
        return until_logged in caplog.text and answers(target, root_certificates=authority.file)

    try:
        assert answers(target, root_certificates=old.file)
        mount("..v2", new)
        assert switches_to(new) and not answers(target, root_certificates=old.file)
        # Renewed by hand, one file at a time: the new certificate with the old key is not
        # taken (it is no pair), and the pair is once its key arrives.
        third_cert, third_key = third.issue("server")
        os.replace(third_cert, secret / "..v2" / "tls.crt")
        assert keeps(new, until_logged="is not an unencrypted private key of the certificate")
        os.replace(third_key, secret / "..v2" / "tls.key")
        assert switches_to(third) and not answers(target, root_certificates=new.file)
        # An expired pair is no renewal: every client would refuse it.
        expired_cert, expired_key = third.issue("server", valid=(-dt.timedelta(days=2), -dt.timedelta(days=1)))
        os.replace(expired_key, secret / "..v2" / "tls.key")
        os.replace(expired_cert, secret / "..v2" / "tls.crt")
        assert keeps(third, until_logged="/tls.crt expired at ")
    finally:
        server.stop(0)


def _watched_credentials(tmp_path: Path, monkeypatch, cert: Path, key: Path, client_ca: Path | None = None) -> tuple[auth.TlsCredentials, StoppedClock]:
    """The port's credentials from these files, looking at them on auth's stopped clock.
    gRPC asks ``_fetch`` on each new connection: None keeps what it serves, a configuration
    replaces it."""
    clock = StoppedClock()
    monkeypatch.setattr(auth, "time", clock)
    settings = default_config().replace("server", data_dir=str(tmp_path / "data"), tls_cert_file=str(cert), tls_key_file=str(key),
                                        tls_client_ca_file=str(client_ca or "")).server
    return auth.TlsCredentials(settings), clock


def test_a_renewed_certificate_not_valid_yet_is_taken_once_it_is_with_no_other_change(tmp_path, monkeypatch, caplog):
    # A renewal from a CA whose clock runs ahead starts a little later: refused then, it must
    # be looked at again, not only once the files next change (the old one expires meanwhile).
    authority = Authority(tmp_path, "ca")
    cert, key = authority.issue("server")
    credentials, clock = _watched_credentials(tmp_path, monkeypatch, cert, key)
    ahead = dt.timedelta(minutes=5)
    renewed_cert, renewed_key = authority.issue("renewed", valid=(ahead, dt.timedelta(days=1)))
    os.replace(renewed_key, key)
    os.replace(renewed_cert, cert)
    clock.advance(auth.RECHECK_INTERVAL_S)
    assert credentials._fetch() is None and f"the certificate in {cert} is valid from " in caplog.text

    class Later(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime.now(tz) + 2 * ahead

    monkeypatch.setattr(auth, "dt", SimpleNamespace(datetime=Later, timezone=dt.timezone))
    clock.advance(auth.RECHECK_INTERVAL_S)
    assert credentials._fetch() is not None


def test_tls_files_left_unusable_are_logged_once_and_a_pair_taken_is_not_taken_again(tmp_path, monkeypatch, caplog):
    authority = Authority(tmp_path, "ca")
    cert, key = authority.issue("server")
    credentials, clock = _watched_credentials(tmp_path, monkeypatch, cert, key)
    for name, with_key, warned in (("second", False, 1), ("third", True, 1), ("fourth", False, 2)):
        new_cert, new_key = authority.issue(name)
        os.replace(new_cert, cert)  # without its key: no pair
        if with_key:
            os.replace(new_key, key)
        for look in range(2):  # a broken pair is read again at each look, not logged again; a pair taken is not taken again
            clock.advance(auth.RECHECK_INTERVAL_S)
            assert (credentials._fetch() is not None) == (with_key and look == 0), (name, look)
        assert caplog.text.count("is not an unencrypted private key of the certificate in") == warned, name


def test_a_rotated_client_ca_is_taken_without_a_restart(tmp_path, monkeypatch):
    # Mutual TLS: clients' certificates signed by a new CA are let in once its file is swapped in.
    authority, old_ca, new_ca = Authority(tmp_path, "ca"), Authority(tmp_path, "clients-old"), Authority(tmp_path, "clients-new")
    cert, key = authority.issue("server")
    client_ca = tmp_path / "client-ca.pem"
    client_ca.write_bytes(old_ca.file.read_bytes())
    credentials, clock = _watched_credentials(tmp_path, monkeypatch, cert, key, client_ca)
    clock.advance(auth.RECHECK_INTERVAL_S)
    assert credentials._fetch() is None  # nothing changed
    os.replace(new_ca.file, client_ca)
    clock.advance(auth.RECHECK_INTERVAL_S)
    assert credentials._fetch() is not None


def test_a_renewal_landing_between_the_reads_of_the_key_and_the_certificate_is_not_taken_as_a_pair(tmp_path, monkeypatch, caplog):
    # The key read before a renewal, the certificate after: OpenSSL, reading both again,
    # checks the new pair, while gRPC would be handed the old key with the new certificate,
    # and every handshake fail until the files next changed.
    authority = Authority(tmp_path, "ca")
    cert, key = authority.issue("server")
    credentials, clock = _watched_credentials(tmp_path, monkeypatch, cert, key)
    renewals = [authority.issue("second"), authority.issue("third")]
    read_pem = auth._pem

    def renewed_after_the_key_read(path: str, name: str, kind: str) -> bytes:
        data = read_pem(path, name, kind)
        if name == "tls_key_file" and len(renewals) == 1:  # the reload of the first renewal has read its key
            for source, target in zip(renewals.pop(), (cert, key)):
                os.replace(source, target)
        return data

    monkeypatch.setattr(auth, "_pem", renewed_after_the_key_read)
    for source, target in zip(renewals.pop(0), (cert, key)):
        os.replace(source, target)
    clock.advance(auth.RECHECK_INTERVAL_S)
    assert credentials._fetch() is None and f"{cert} changed while being read" in caplog.text
    clock.advance(auth.RECHECK_INTERVAL_S)
    assert credentials._fetch() is not None


def test_unusable_tls_settings_are_refused_before_serving(tmp_path, capsys):
    authority = Authority(tmp_path, "ca")
    cert, key = authority.issue("server")
    with pytest.raises(ConfigError, match=r"set both \[server\].tls_cert_file and \[server\].tls_key_file"):
        default_config().replace("server", tls_cert_file=str(cert))
    with pytest.raises(ConfigError, match=r"tls_client_ca_file needs TLS"):
        default_config().replace("server", tls_client_ca_file=str(authority.file))
    data, another_key = ["--port", "0", "--data-dir", str(tmp_path / "data")], authority.issue("another")[1]
    for flags, message in (
        # A file given by flag: the flag the operator typed leads, then the key it sets.
        (["--tls-cert-file", str(tmp_path / "missing.pem"), "--tls-key-file", str(key)],
         f"error: --tls-cert-file: [server].tls_cert_file: cannot read {tmp_path / 'missing.pem'}"),
        (["--tls-cert-file", str(key), "--tls-key-file", str(key)], f"error: --tls-cert-file: [server].tls_cert_file: {key} holds no PEM CERTIFICATE"),
        (["--tls-cert-file", str(cert), "--tls-key-file", str(cert)], f"error: --tls-key-file: [server].tls_key_file: {cert} holds no PEM PRIVATE KEY"),
        (["--tls-cert-file", str(cert), "--tls-key-file", str(another_key)],
         f"error: --tls-key-file: [server].tls_key_file: {another_key} is not an unencrypted private key of the certificate in {cert}"),
        (["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-client-ca-file", str(tmp_path / "missing-ca.pem")],
         f"error: --tls-client-ca-file: [server].tls_client_ca_file: cannot read {tmp_path / 'missing-ca.pem'}"),
        (["--tls-key-file", str(key)], "error: --tls-key-file: set both [server].tls_cert_file and [server].tls_key_file"),
        (["--tls-client-ca-file", str(authority.file)], "error: --tls-client-ca-file: [server].tls_client_ca_file needs TLS"),
    ):
        assert main(["serve", *flags, *data]) == 1
        assert message in capsys.readouterr().err, flags
    # A certificate outside its validity, which every client would refuse (checked before serving: if it were not, serve would serve).
    for name, valid, when in (("old", (-dt.timedelta(days=9), -dt.timedelta(days=2)), "expired at "),
                              ("early", (dt.timedelta(days=1), dt.timedelta(days=9)), "is valid from ")):
        dated_cert, dated_key = authority.issue(name, valid=valid)
        with pytest.raises(ConfigError, match=f"^\\[server\\].tls_cert_file: the certificate in {re.escape(str(dated_cert))} {when}"):
            ExplaindServer(default_config().replace("server", data_dir=str(tmp_path / "data"), tls_cert_file=str(dated_cert),
                                                    tls_key_file=str(dated_key)))
    with pytest.raises(ValueError, match="private_key and certificate_chain go together"):
        Client("127.0.0.1:1", private_key=key)
    with pytest.raises(ValueError, match="root_certificates: .* is not a PEM file"):
        Client("127.0.0.1:1", root_certificates=_not_pem(tmp_path))
    (tmp_path / "private_key_dir").mkdir()  # a path holding a parameter's name stays as it is
    assert main(["--target", "127.0.0.1:1", "--ca-file", str(tmp_path / "private_key_dir" / "ca.pem"), "info"]) == 1
    assert f"error: --ca-file: no file {tmp_path / 'private_key_dir' / 'ca.pem'}" in capsys.readouterr().err
    assert main(["--target", "127.0.0.1:1", "--cert-file", str(cert), "--key-file", str(tmp_path / "private_key_dir"), "info"]) == 1
    assert f"error: --key-file: cannot read {tmp_path / 'private_key_dir'}: Is a directory" in capsys.readouterr().err
    assert "demo serves on loopback without TLS" in _demo_error(tmp_path, cert, key, capsys)


def test_a_certificates_validity_is_read_as_openssl_reads_it(tmp_path):
    # UTCTime for 1950-2049, GeneralizedTime from 2050 (RFC 5280, 4.1.2.5).
    from explaind.service.auth import certificate_validity

    authority = Authority(tmp_path, "ca")
    since_1950 = dt.datetime(1950, 1, 2, tzinfo=dt.timezone.utc) - dt.datetime.now(dt.timezone.utc)  # UTCTime "50...": 1950, not 2050
    for valid in ((-dt.timedelta(days=400), dt.timedelta(days=3)), (dt.timedelta(days=10), dt.timedelta(days=365 * 40)),
                  (since_1950, dt.timedelta(days=3))):
        cert, _ = authority.issue("server", valid=valid)
        parsed = x509.load_pem_x509_certificate(cert.read_bytes())
        assert certificate_validity(cert.read_bytes() + authority.file.read_bytes()) == (parsed.not_valid_before_utc, parsed.not_valid_after_utc)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="makes its certificate with the openssl command")
def test_the_validity_of_a_version_1_certificate_is_read_too(tmp_path):
    # `openssl x509 -req` without extensions signs a version 1 certificate: no [0] version
    # before its serial number, which the reader must not skip as if it were one.
    from explaind.service.auth import certificate_validity

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "v1.key")
    openssl("req", "-new", "-key", "v1.key", "-subj", "/CN=v1", "-out", "v1.csr")
    openssl("x509", "-req", "-in", "v1.csr", "-signkey", "v1.key", "-days", "3", "-out", "v1.pem")
    parsed = x509.load_pem_x509_certificate((tmp_path / "v1.pem").read_bytes())
    assert parsed.version == x509.Version.v1
    assert certificate_validity((tmp_path / "v1.pem").read_bytes()) == (parsed.not_valid_before_utc, parsed.not_valid_after_utc)

def _not_pem(tmp_path: Path) -> Path:
    path = tmp_path / "ca.txt"
    path.write_text("hello")
    return path


def _demo_error(tmp_path: Path, cert: Path, key: Path, capsys) -> str:
    config = tmp_path / "tls.toml"
    config.write_text(f'[server]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n')
    assert main(["demo", "--config", str(config)]) == 1
    return capsys.readouterr().err


def test_a_client_given_a_ca_file_alone_reprs_as_the_tls_client_it_is(tmp_path):
    # root_certificates alone connects over TLS as tls=True does: its repr says so too.
    with Client("127.0.0.1:1", root_certificates=Authority(tmp_path, "servers").file) as client:
        assert repr(client) == "Client('127.0.0.1:1', timeout=30.0, tls=True)"

"""`make demo` runs `explaind demo`: a live server on the shapes world and a full client session."""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def run_demo(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    """The demo in a subprocess whose temporary directory, where it leaves its report for
    the user, is ``tmp_path``: a test run leaves nothing in the machine's /tmp."""
    return subprocess.run([sys.executable, "-m", "explaind.client.cli", "demo", *options], capture_output=True, text=True,
                          timeout=600, check=False, env={**os.environ, "TMPDIR": str(tmp_path)})


def test_demo_predicts_evaluates_and_explains_the_worst_class(tmp_path):
    result = run_demo(tmp_path, "--count", "120")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "predictions for spurious_background test images" in out
    # Every printed prediction line names a world class with a probability.
    assert len(re.findall(r"^\w+ \(\w+\)\s+\w+ \d\.\d\d", out, flags=re.M)) == 12
    assert re.search(r"accuracy 0\.\d+ on 120 samples", out)
    # The planted shortcut makes hearts the worst class; the loop ranks neurons for it.
    assert "explaining the mistakes of 'heart'" in out
    # The report's ranking comes with its stability (200 resamples unless --stability says otherwise).
    assert re.search(r"^ +neuron +direction +insufficient +excessive +importance +stability +top classes\n"
                     r" +\d+ +(insufficient|excessive|both) +\d+% +\d+% +\d\.\d\d +\d+%", out, re.M)
    assert "stability: share of 200 bootstrap resamples of the mistakes" in out
    report = Path(re.search(r"HTML report .*: (\S+\.html)", out).group(1))
    assert report.is_file() and report.read_text().count("<img") >= 2 and report.parent.parent == tmp_path
    # What it wrote for the user stays; the server's store (images, database) does not.
    assert sorted(path.name for path in report.parent.iterdir()) == ["explaind.toml", "mistakes.png", report.name]


@pytest.mark.parametrize("server", ['token_file = "token"', 'callers_file = "token"', 'callers_file = "token"\nadmins = ["ops"]'])
def test_demo_with_a_config_that_asks_for_a_token_sends_it(tmp_path, server, monkeypatch, capfd):
    # The demo's client sent no token, so the first call after "server ready" failed
    # UNAUTHENTICATED (with named callers too: it sent their file's text); and a set without
    # mistakes has nothing to explain (not an error). The token is in a file beside the
    # config, as a mounted secret would be. The demo's session runs in this process (its
    # server is still a subprocess): the command line is the test above's.
    from explaind.client.cli import main

    config = tmp_path / "explaind.toml"
    (tmp_path / "token").write_text("s3cret\n" if "token_file" in server else "analyst an4lyst\nops s3cret\n")
    config.write_text(f'[server]\n{server}\n')  # the balanced classifier, no CLIP
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the demo leaves its report
    code = main(["demo", "--count", "6", "--config", str(config)])
    printed = capfd.readouterr()  # the server's output too: its stderr is this process's
    assert code == 0, printed.err[-2000:]
    assert re.search(r"accuracy \d\.\d+ on 6 samples", printed.out)
    assert "UNAUTHENTICATED" not in printed.err


def test_the_demos_server_gets_a_port_the_kernel_hands_to_no_one_unasked():
    # Its port was a bind(("", 0)) probe's, bound again by the server seconds later: another
    # process's bind of port 0 meanwhile could get the same one, and the server failed to
    # start (or the session reached that other server).
    import socket

    from explaind.client.cli import _free_port

    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:
        pytest.skip("no /proc/sys/net/ipv4/ip_local_port_range: not Linux")
    port = _free_port()
    assert 1024 <= port < ephemeral_low
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))  # free, as the server finds it


def test_without_the_kernel_s_port_range_file_ports_below_32768_are_taken(monkeypatch):
    # Not Linux (no /proc): 32768 is below the ephemeral ranges of the others too.
    from explaind.client.cli import _ports_below_the_ephemeral_range

    read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda path, *args, **kwargs: (_ for _ in ()).throw(FileNotFoundError(2, "No such file"))
                        if str(path).startswith("/proc/") else read_text(path, *args, **kwargs))
    assert _ports_below_the_ephemeral_range() == range(1024, 32768)


def test_a_port_taken_is_passed_over_and_none_free_is_none():
    import socket

    from explaind.client.cli import _bindable_port

    with socket.socket() as taken, socket.socket() as other:
        taken.bind(("127.0.0.1", 0))
        other.bind(("127.0.0.1", 0))
        busy, also_busy = taken.getsockname()[1], other.getsockname()[1]
        other.close()  # free again
        assert _bindable_port(iter([busy, also_busy])) == also_busy
        assert _bindable_port([busy, busy]) is None


def test_with_no_port_free_below_the_ephemeral_range_the_demo_takes_one_the_kernel_hands_out(monkeypatch):
    import socket

    from explaind.client import cli

    monkeypatch.setattr(cli, "_bindable_port", lambda candidates: None)  # every port tried is taken
    port = cli._free_port()
    assert port not in cli._ports_below_the_ephemeral_range()
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))  # free, as the server finds it

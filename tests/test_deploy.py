"""deploy/ agrees with the server: the dashboard and the alert rules query series the
server exports, by labels they carry; Prometheus scrapes the port the image serves
metrics on; the Helm templates read only values the chart defines. There is no Docker
daemon or helm binary in CI, so those files are checked as data (the compose file by
docker-compose's schema, its healthcheck against a real server). Prometheus itself is
there (``make test`` installs Debian's), so the alert rules pass their promtool unit
tests, and a real Prometheus with the shipped config scrapes a real server: every
dashboard panel shows data, no alert is pending on a healthy server, and ExplaindDown
goes pending once it is killed. Helm's template engine is there too (Go's text/template with Sprig, from
Debian, in tests/helmtemplate), so the chart renders to manifests that Kubernetes'
schemas accept."""

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram, Info, generate_latest

from conftest import free_port
from explaind.client import Client
from explaind.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SERIES = re.compile(r"((?:explaind|process)_\w+)(?:\{([^}]*)\})?")  # the server's own series and its process's
MATCHER_LABEL = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def exported_series() -> dict[str, set[str]]:
    """Series name -> label names, as a scrape shows them once every metric has a value."""
    metrics = Metrics()
    for metric in vars(metrics).values():
        if isinstance(metric, (Counter, Gauge, Histogram, Info)):
            child = metric.labels(*["x"] * len(metric._labelnames)) if metric._labelnames else metric
            if isinstance(child, Histogram):
                child.observe(1)
            elif isinstance(child, Info):
                child.info({"name": "x"})
            else:
                child.inc()
    series: dict[str, set[str]] = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, _, labels = line.split(" ")[0].partition("{")
            series.setdefault(name, set()).update(re.findall(r'(\w+)="', labels))
    return series


def image_entrypoint() -> list[str]:
    """The image's ENTRYPOINT (exec form), e.g. ["explaind", "serve", "--port", ...]."""
    line = next(line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith("ENTRYPOINT"))
    return json.loads(line.removeprefix("ENTRYPOINT"))


def image_environment() -> dict[str, str]:
    """The image's ENV values (one ``ENV NAME=value`` per line), e.g. XDG_CACHE_HOME."""
    return dict(re.findall(r"^ENV (\w+)=(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE))


# The histograms whose observations carry their trace's id as an exemplar (with tracing on).
EXEMPLAR_HISTOGRAMS = ("explaind_rpc_duration_seconds", "explaind_job_duration_seconds", "explaind_job_queue_wait_seconds",
                       "explaind_job_stage_duration_seconds")

# A value for each of the dashboard's variables: one the real Prometheus below has series of.
DASHBOARD_VARIABLES = {"kind": "rank_mistake_neurons"}


def dashboard_variables() -> list[dict]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "explaind.json").read_text()).get("templating", {}).get("list", [])


def dashboard_queries(*, exemplars: bool = False) -> list[tuple[str, str]]:
    """(panel title, PromQL) with the variables (``$kind``) set as DASHBOARD_VARIABLES; with
    ``exemplars``, those of the targets that show exemplars only."""
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "explaind.json").read_text())
    assert {variable["name"] for variable in dashboard_variables()} == set(DASHBOARD_VARIABLES)

    def with_variables(expr: str) -> str:
        return re.sub(r"\$(\w+)", lambda match: DASHBOARD_VARIABLES[match[1]], expr)

    return [(panel["title"], with_variables(target["expr"])) for panel in dashboard["panels"] for target in panel.get("targets", [])
            if target.get("exemplar") or not exemplars]


def prometheus_command() -> list[str]:
    """The arguments compose runs Prometheus with."""
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["prometheus"]["command"]


def dashboard_variable_labels() -> list[tuple[str, str, str]]:
    """(variable, series, label) of each variable's label_values(series, label)."""
    found = [(variable["name"], re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"])) for variable in dashboard_variables()]
    assert all(match for _, match in found), found
    return [(name, *match.groups()) for name, match in found]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def queries() -> list[tuple[str, str]]:
    """(panel title or "alert NAME", PromQL) of the dashboard and the alert rules."""
    return dashboard_queries() + [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]


def test_dashboard_and_alert_queries_only_series_and_labels_the_server_exports():
    series = exported_series()
    assert len(dashboard_queries()) >= 6 and len(alert_rules()) >= 4
    for title, expr in queries():
        used = SERIES.findall(expr)
        assert used or expr.startswith("up{"), f"{title}: no explaind series in {expr!r}"
        labels: set[str] = set()
        for name, matchers in used:
            assert name in series, f"{title}: {name} is not exported; the server has {sorted(series)}"
            # job and instance: the target labels Prometheus adds
            assert set(MATCHER_LABEL.findall(matchers)) <= series[name] | {"job", "instance"}, f"{title}: {name}{{{matchers}}}"
            labels |= series[name]
        for grouping in GROUPING.findall(expr):  # or the labels Prometheus gives every scraped series
            assert {label.strip() for label in grouping.split(",")} <= labels | {"job", "instance"}, f"{title}: by ({grouping}) in {expr!r}"
    for variable, name, label in dashboard_variable_labels():
        assert label in series.get(name, set()), f"variable {variable}: {name} has no label {label}"


def test_counters_and_histograms_come_without_created_series():
    # prometheus_client's default: a `_created` gauge beside each, a tenth of the series,
    # stored by Prometheus and read by no query.
    series = exported_series()
    assert "explaind_jobs_ended_total" in series and "explaind_rpc_duration_seconds_count" in series
    assert [name for name in series if name.endswith("_created")] == []


def test_readme_metrics_paragraph_names_every_series_the_server_exports():
    # An operator's list of what /metrics shows: a series added without a line there is
    # one no dashboard user learns of. Names such as explaind_data_dir_{free,size}_bytes
    # stand for each of their names.
    readme = (DEPLOY.parent / "README.md").read_text()
    named = set(re.findall(r"`(explaind_\w+?)(?:_bucket|_sum|_count)?[{`]", readme))
    for prefix, names, suffix in re.findall(r"`(explaind_\w*?)\{(\w+(?:,\w+)+)\}(\w+)`", readme):
        named |= {prefix + name + suffix for name in names.split(",")}
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in exported_series() if name.startswith("explaind_")}
    assert families - named == set(), f"README's Metrics paragraph misses {sorted(families - named)}"


def test_the_job_failure_alert_counts_the_codes_the_server_exports_at_zero():
    # Only INTERNAL was exported at zero: a kind's first DATA_LOSS was born at 1, and
    # increase() over it, 0, never fired the alert.
    from explaind.jobs import ALERTED_FAILURE_CODES

    expr = next(rule["expr"] for rule in alert_rules() if rule["alert"] == "ExplaindJobsFailing")
    assert re.search(r'code=~"([^"]*)"', expr).group(1).split("|") == list(ALERTED_FAILURE_CODES)


def test_dashboard_queries_work_under_any_scrape_job_name():
    # The chart's pods are scraped by their prometheus.io annotations, under a job name of
    # that Prometheus's choosing: the memory panel, matching job="explaind", stayed empty.
    for title, expr in dashboard_queries():
        assert not re.search(r"\bjob\s*(=~|!~|!=|=)", expr), f"{title}: {expr!r}"


def test_job_latency_panels_read_windows_long_enough_to_hold_a_job_s_end():
    # A visualisation or an edit runs for minutes and ends a few times an hour: over 5
    # minutes most windows held no observation, and the job p99 panels showed no data
    # most of the time. 30 minutes, as the alerts on calls made every few minutes read.
    job_series = re.compile(r"explaind_job_(?:duration|queue_wait|stage_duration)_seconds")
    read = [(title, expr) for title, expr in dashboard_queries() if job_series.search(expr)]
    assert len(read) >= 5
    for title, expr in read:
        assert set(re.findall(r"\[(\w+)\]", expr)) == {"30m"}, (title, expr)


def test_dashboard_panels_state_the_unit_of_what_they_plot():
    # Without one Grafana prints a p99 of 0.0042 as "0.00420" and 90 s as "90": seconds of
    # Predict and hours of visualisations, free bytes of a data dir, read as bare numbers.
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "explaind.json").read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "timeseries":
            continue
        exprs, unit = [target["expr"] for target in panel["targets"]], panel["fieldConfig"]["defaults"].get("unit")
        if all(re.search(r"_seconds_(bucket|sum)\b", expr) for expr in exprs):
            assert unit == "s", panel["title"]
        elif all("_bytes" in expr for expr in exprs):
            assert unit == "bytes", panel["title"]
        else:
            assert unit, panel["title"]


def test_dashboard_and_alert_label_values_name_real_rpcs():
    from explaind.v1 import inference_pb2, neuroinspect_pb2, operations_pb2, sample_sets_pb2

    services = {service.name: service for module in (inference_pb2, neuroinspect_pb2, operations_pb2, sample_sets_pb2)
                for service in module.DESCRIPTOR.services_by_name.values()}
    methods = {method.name for service in services.values() for method in service.methods}
    for title, expr in queries():
        for label, operator, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', expr):
            if label == "method" and operator == "=":
                assert value in methods, f"{title}: no RPC method {value!r}"
            if label == "service":  # names in a pattern such as explaind.v1.(InferenceService|SampleSetService)
                named = re.findall(r"[A-Z]\w*Service", value)
                assert named and set(named) <= set(services), f"{title}: {value!r} names services that do not exist"


def _rpcs() -> set[tuple[str, str]]:
    """(service, method) of every RPC the server times: the proto's, and gRPC health's."""
    from explaind.v1 import inference_pb2, neuroinspect_pb2, operations_pb2, sample_sets_pb2

    return {(service.full_name, method.name) for module in (inference_pb2, neuroinspect_pb2, operations_pb2, sample_sets_pb2)
            for service in module.DESCRIPTOR.services_by_name.values() for method in service.methods} | {
        ("grpc.health.v1.Health", "Check"), ("grpc.health.v1.Health", "Watch")}


def _selects(matchers: str, labels: dict[str, str]) -> bool:
    """Whether a selector's ``matchers`` keep a series with ``labels``, as Prometheus matches
    them (regular expressions anchored at both ends); matchers of other labels ignored."""
    tests = {"=": lambda value, given: value == given, "!=": lambda value, given: value != given,
             "=~": lambda value, given: re.fullmatch(given, value) is not None, "!~": lambda value, given: re.fullmatch(given, value) is None}
    return all(tests[operator](labels[label], given)
               for label, operator, given in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers) if label in labels)


def test_each_rpc_latency_query_selects_the_rpcs_its_title_names():
    # "Explanation RPC latency" excluded three services and kept NeuroInspectService whole:
    # its head-version reads and writes, milliseconds each, mixed in with the rankings.
    rpcs = _rpcs()
    explanations = {("explaind.v1.NeuroInspectService", method) for method in ("RankMistakeNeurons", "VisualizeNeurons", "EditHead")}
    predict = {("explaind.v1.InferenceService", "Predict")}
    expected = {"Explanation RPC latency p50 / p99 (by method)": explanations, "Predict latency p50 / p99": predict,
                "alert ExplaindPredictSlow": predict}
    rpc_queries = [(title, matchers) for title, expr in queries() for name, matchers in SERIES.findall(expr)
                   if name.startswith("explaind_rpc_duration_seconds")]
    assert {title for title, _ in rpc_queries} >= set(expected)
    for title, matchers in rpc_queries:  # a query its title gives no narrower set is over every RPC: a rate by code, an alert by method
        selected = {(service, method) for service, method in rpcs if _selects(matchers, {"service": service, "method": method})}
        assert selected == expected.get(title, rpcs), f"{title}: {{{matchers}}}"


def test_only_explanation_jobs_are_in_a_query_titled_explanation():
    # "Explanation job duration" and "... queue wait" showed evaluate_sample_set, no explanation.
    from explaind.engine.core import EVALUATE_KIND
    from explaind.engine.neuroinspect import EDIT_KIND, RANK_KIND, VISUALIZE_KIND

    explanations = {RANK_KIND, VISUALIZE_KIND, EDIT_KIND}
    job_queries = [(title, name, matchers, {kind for kind in explanations | {EVALUATE_KIND} if _selects(matchers, {"kind": kind})})
                   for title, expr in queries() for name, matchers in SERIES.findall(expr) if name.startswith("explaind_job")]
    assert any(EVALUATE_KIND in kinds for *_, kinds in job_queries)  # the panels the check below is for
    for title, name, matchers, kinds in job_queries:
        if title.startswith("Explanation"):
            assert kinds <= explanations, f"{title}: {name}{{{matchers}}} selects {sorted(kinds - explanations)}"


def test_alert_descriptions_name_commands_the_cli_takes_and_keys_the_config_has():
    # An operator paged at night runs what the description says: a renamed option or key
    # there would send them to a usage error or a key that does not exist.
    import dataclasses

    from explaind.client.cli import parse_arguments
    from explaind.config import Config

    placeholders = {"{{ $labels.kind }}": "edit_head", "NAME": "0123456789abcdef", "ID": "v1"}
    commands = []
    for rule in alert_rules():
        text = rule["annotations"]["description"]
        for match in re.finditer(r"explaind ((?:\{\{ \$labels\.\w+ \}\}|[\w-]+)(?: (?:\{\{ \$labels\.\w+ \}\}|[\w-]+))*)", text):
            words = re.findall(r"\{\{ \$labels\.\w+ \}\}|[\w-]+", match[1])
            # The command ends after its last option's value, or its last placeholder, or its action.
            ends = [i + 1 + (words[i].startswith("--")) for i, word in enumerate(words) if word.startswith("--") or word in placeholders]
            argv = [placeholders.get(word, word) for word in words[:max(ends, default=2)]]
            parse_arguments(argv)  # SystemExit(2) for an unknown command, action or option
            commands.append(argv)
        for section, key in re.findall(r"\[(\w+)\]\.(\w+)", text):
            assert key in {f.name for f in dataclasses.fields(getattr(Config(), section))}, f"alert {rule['alert']}: no [{section}].{key}"
    assert ["operations", "list", "--kind", "edit_head", "--state", "failed"] in commands and len(commands) >= 6, commands


def test_dashboard_datasource_is_the_provisioned_prometheus():
    provisioned = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {source["uid"] for source in provisioned["datasources"] if source["type"] == "prometheus"}
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "explaind.json").read_text())
    assert {panel["datasource"]["uid"] for panel in dashboard["panels"]} <= uids


def test_prometheus_scrapes_the_port_the_image_serves_metrics_on():
    command = image_entrypoint()
    metrics_port = command[command.index("--metrics-port") + 1]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert f"127.0.0.1:{metrics_port}:{metrics_port}" in compose["services"]["explaind"]["ports"]
    # Without a token, nothing is published beyond the host's loopback.
    assert all(port.startswith("127.0.0.1:") for service in compose["services"].values() for port in service.get("ports", []))
    # A crash or the host's reboot left the stack down.
    assert {service["restart"] for service in compose["services"].values()} == {"unless-stopped"}
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for config in job["static_configs"] for t in config["targets"]]
    assert targets == [f"explaind:{metrics_port}"]
    # The rules Prometheus loads are the file compose mounts beside its config.
    assert scrape["rule_files"] == ["alerts.yml"]
    assert "./alerts.yml:/etc/prometheus/alerts.yml:ro" in compose["services"]["prometheus"]["volumes"]


def test_latency_panels_show_the_exemplars_prometheus_stores():
    """Each latency quantile of a histogram with exemplars asks Grafana for them (every one:
    Grafana runs the exemplar query of a panel's first visible target of a histogram only),
    and compose's Prometheus keeps them; it still reads the config compose mounts."""
    for title, expr in dashboard_queries():
        shows = (title, expr) in dashboard_queries(exemplars=True)
        quantile_with_exemplars = expr.startswith("histogram_quantile(") and any(f"{name}_bucket" in expr for name in EXEMPLAR_HISTOGRAMS)
        assert shows == quantile_with_exemplars, (title, expr)
    assert len(dashboard_queries(exemplars=True)) >= 6
    command = prometheus_command()
    assert "--enable-feature=exemplar-storage" in command
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounted = {volume.split(":")[1] for volume in compose["services"]["prometheus"]["volumes"]}
    assert {flag.partition("=")[2] for flag in command if flag.startswith("--config.file=")} <= mounted
    assert "--config.file=/etc/prometheus/prometheus.yml" in command and "--storage.tsdb.path=/prometheus" in command


def test_compose_runs_the_server_on_a_read_only_root_with_what_it_writes_mounted():
    # As the chart does: the data dir a volume, /tmp and the image's XDG_CACHE_HOME writable.
    service = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["explaind"]
    assert service["read_only"] is True
    assert sorted(service["tmpfs"]) == sorted(["/tmp", image_environment()["XDG_CACHE_HOME"]])
    command = image_entrypoint()
    assert [volume.split(":")[1] for volume in service["volumes"]] == [command[command.index("--data-dir") + 1]]


def test_the_image_installs_the_project_dependencies_before_copying_the_sources(tmp_path):
    """So a source edit rebuilds the small layers only (no Docker here: the steps' order and
    the dependency list they install are checked, the list by running the step's Python)."""
    lines = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    dependency_step = next(i for i, line in enumerate(lines) if "requirements.txt" in line)
    copied_before = [line.split()[1:-1] for line in lines[:dependency_step] if line.startswith("COPY")]
    assert copied_before == [["pyproject.toml"]]  # the README too rebuilt the torch layer at each edit
    assert [line for line in lines if line.startswith("RUN pip install")] == ["RUN pip install --no-cache-dir --no-deps ."]
    assert dependency_step < min(i for i, line in enumerate(lines) if line.startswith("COPY server"))
    program = shlex.split(lines[dependency_step].removeprefix("RUN "))[2]  # python -c PROGRAM > ...
    shutil.copy(DEPLOY.parent / "pyproject.toml", tmp_path)
    listed = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.splitlines()
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert listed == project["dependencies"] + extras["tracing"] + extras["stable-diffusion"] and "torch==2.14.1" in listed

def test_the_image_builds_on_a_named_debian_release_and_the_projects_python():
    """python:3.11-slim follows Debian's newest release: a rebuild of the same sources got
    another C library and system packages."""
    from packaging.specifiers import SpecifierSet

    base = next(line.split()[1] for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith("FROM "))
    tag = base.partition("@")[0].partition(":")[2]
    assert "@sha256:" in base or re.fullmatch(r"3\.\d+(\.\d+)?-slim-(bookworm|trixie)", tag), base
    python = re.match(r"3\.\d+", tag)[0]
    requires = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python + ".0" in SpecifierSet(requires), (python, requires)


def test_compose_file_is_valid_compose():
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (make test installs Debian's)")
    checked = subprocess.run([compose, "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_compose_healthcheck_asks_the_health_port_and_passes_on_a_serving_server_only(server_factory, tmp_path):
    from explaind.config import default_config
    from explaind.service import ExplaindServer

    service = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["explaind"]
    arguments = serve_arguments({"args": service["command"]})  # compose's command follows the image's entrypoint
    assert arguments.health_port not in (0, arguments.port, arguments.metrics_port)
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    address = f"127.0.0.1:{arguments.health_port}"
    assert f"'{address}'" in test[3]  # the port the container serves health on
    # Unhealthy 30 s into loading the models, before: the start-up the chart allows counts no failure.
    assert service["healthcheck"]["start_period"] == f"{yaml.safe_load((DEPLOY / 'helm' / 'explaind' / 'values.yaml').read_text())['startupSeconds']}s"
    server_factory(server={"health_port": (serving_health := free_port())})
    loading = ExplaindServer(default_config().replace("server", port=0, health_port=free_port(), data_dir=str(tmp_path)))  # models not loaded
    try:
        loading.start()
        for port, healthy in ((serving_health, True), (loading.health_port, False), (free_port(), False)):
            checked = subprocess.run([sys.executable, "-c", test[3].replace(address, f"127.0.0.1:{port}")], capture_output=True, text=True, timeout=60)
            assert (checked.returncode == 0) == healthy, (port, checked.stderr[-2000:])
    finally:
        loading.stop(0)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (make test installs Debian's prometheus)")
    return path


def test_alert_rules_pass_their_promtool_unit_tests():
    check = subprocess.run([promtool(), "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True, text=True)
    assert check.returncode == 0 and f"SUCCESS: {len(alert_rules())} rules found" in check.stdout, check.stdout + check.stderr
    unit = Path(__file__).parent / "promtool" / "alerts_test.yml"
    tested = subprocess.run([promtool(), "test", "rules", str(unit)], capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every alert has a unit test that expects it to fire.
    assert {rule["alert"] for rule in alert_rules()} <= set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n", unit.read_text()))


def render_chart(renderer: Path, **overrides: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(renderer), str(DEPLOY / "helm" / "explaind"), json.dumps(overrides)], capture_output=True, text=True)


def rendered(renderer: Path, **overrides: object) -> dict[str, dict]:
    """The chart's manifests for these values, by kind (the StatefulSet's headless
    Service as "HeadlessService"), each valid (strictly: no unknown field) for
    Kubernetes 1.27, where gRPC probes are GA, and the newest known."""
    import kubernetes_validate

    result = render_chart(renderer, **overrides)
    assert result.returncode == 0, result.stderr
    manifests = [document for document in yaml.safe_load_all(result.stdout) if document]
    for manifest in manifests:
        for version in ("1.27.0", kubernetes_validate.latest_version()):
            kubernetes_validate.validate(manifest, version, strict=True)
    by_kind = {"HeadlessService" if manifest.get("spec", {}).get("clusterIP") == "None" else manifest["kind"]: manifest
               for manifest in manifests}
    assert len(by_kind) == len(manifests), [manifest["kind"] for manifest in manifests]
    return by_kind


def serve_arguments(container: dict) -> argparse.Namespace:
    """What `explaind serve` makes of the image's entrypoint followed by the pod's args,
    with every check the command line gets (one it refuses is SystemExit)."""
    from explaind.client.cli import parse_arguments

    command = image_entrypoint()
    assert command[:2] == ["explaind", "serve"]
    return parse_arguments([*command[1:], *container.get("args", [])])


@pytest.fixture(scope="module")
def chart_renderer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/helmtemplate built: Helm's template engine (Go text/template + Sprig)."""
    go, sources = shutil.which("go"), Path("/usr/share/gocode/src")
    if go is None or not all((sources / package).is_dir() for package in ("github.com/Masterminds/sprig", "gopkg.in/yaml.v2")):
        pytest.skip("Go, Sprig or yaml.v2 is not installed (make test installs them from Debian)")
    root = tmp_path_factory.mktemp("helmtemplate")
    environment = {**os.environ, "GO111MODULE": "off", "GOPATH": "/usr/share/gocode", "GOCACHE": str(root / "cache"), "GOFLAGS": ""}
    built = subprocess.run([go, "build", "-o", str(root / "helmtemplate"), "."], cwd=Path(__file__).parent / "helmtemplate",
                           env=environment, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return root / "helmtemplate"


def test_helm_chart_renders_valid_manifests_for_a_gpu_and_a_cpu_install(chart_renderer):
    default = rendered(chart_renderer)
    assert set(default) == {"Service", "HeadlessService", "StatefulSet"}  # no config: the image serves the shapes world
    pod = default["StatefulSet"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["args"] == ["--device", "cuda", "--health-port", "50052"] and container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Bounded memory (a leak restarts the pod, not the node), requested as much as it may use:
    # Kubernetes requests a limit's amount where no request is given.
    assert "memory" in container["resources"]["limits"] and "memory" not in container["resources"]["requests"]
    # Not root: the image's user, with the data volume made writable to its group.
    user = re.search(r"^USER (\d+):(\d+)$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    assert pod["spec"]["securityContext"].items() >= {"runAsNonRoot": True, "runAsUser": int(user[1]), "runAsGroup": int(user[2]), "fsGroup": int(user[2])}.items()
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True}
    # With the root file system read-only, what the server writes is a volume: its data dir,
    # /tmp (torch's compile cache, chosen as torchvision is imported: the start failed without
    # it) and XDG_CACHE_HOME (downloaded weights, onnxruntime's id file), the image's own value.
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    environment = {variable["name"]: variable["value"] for variable in container["env"]}
    assert environment["XDG_CACHE_HOME"] == image_environment()["XDG_CACHE_HOME"]
    command = image_entrypoint()
    for path in (command[command.index("--data-dir") + 1], "/tmp", environment["XDG_CACHE_HOME"], image_environment()["TRITON_HOME"]):
        assert path in mounts and not mounts[path].get("readOnly"), path
    # Each bounded: an unbounded emptyDir could fill the node's disk and evict its other pods.
    assert volumes[mounts["/tmp"]["name"]] == {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}
    assert volumes[mounts[environment["XDG_CACHE_HOME"]]["name"]] == {"name": "cache", "emptyDir": {"sizeLimit": "10Gi"}}
    assert mounts["/var/lib/explaind"]["name"] == "data"  # the volume claim
    # The "restricted" Pod Security Standard also asks for the runtime's seccomp profile: without it such a namespace refused the pod.
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    # The server never calls the Kubernetes API: the namespace's default service account token was mounted all the same.
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert not {"tolerations", "nodeSelector", "affinity", "imagePullSecrets"} & pod["spec"].keys()
    assert serve_arguments(container).device == "cuda"
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] == 600
    # Prometheus finds the metrics port the pod, the service and the image agree on.
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == ports["metrics"]
    assert {port["name"]: port["port"] for port in default["Service"]["spec"]["ports"]} == {"grpc": ports["grpc"], "metrics": ports["metrics"]}
    # Each release's Services pick its own pod only: another release's server has another store.
    selector = default["StatefulSet"]["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/instance"] == "release" and selector.items() <= pod["metadata"]["labels"].items()
    assert default["Service"]["spec"]["selector"] == default["HeadlessService"]["spec"]["selector"] == selector
    assert default["StatefulSet"]["spec"]["serviceName"] == default["HeadlessService"]["metadata"]["name"]

    config = '[runtime]\ndevice = "cpu"\n\n[jobs]\nretention_days = 7\n'
    cpu = rendered(chart_renderer, device="cpu", config=config, resources={"limits": {"nvidia.com/gpu": None}}, startupSeconds=125)
    assert cpu["ConfigMap"]["data"]["explaind.toml"] == config  # the TOML arrives as written
    # Another config is another pod template, so an upgrade restarts the server on it.
    checksums = {release["StatefulSet"]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
                 for release in (default, cpu, rendered(chart_renderer, device="cpu", config=config + "\n[server]\nmax_workers = 8\n"))}
    assert len(checksums) == 3
    container = cpu["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["--device", "cpu", "--config", "/etc/explaind/explaind.toml", "--health-port", "50052"]
    assert serve_arguments(container).config == "/etc/explaind/explaind.toml"
    assert "nvidia.com/gpu" not in container["resources"]["limits"] and container["startupProbe"]["failureThreshold"] == 12
    volume = next(volume for volume in cpu["StatefulSet"]["spec"]["template"]["spec"]["volumes"] if "configMap" in volume)
    assert volume["configMap"]["name"] == cpu["ConfigMap"]["metadata"]["name"]
    assert {"name": volume["name"], "mountPath": "/etc/explaind"} in container["volumeMounts"]

    left_to_config = rendered(chart_renderer, device="")["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    assert serve_arguments(left_to_config).device is None and left_to_config["resources"]["limits"]["nvidia.com/gpu"] == 1  # config may say cuda
    # A CPU device held a GPU it never used (or waited Pending for one) unless the limit was nulled by hand.
    limits = rendered(chart_renderer, device="cpu")["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"memory": "16Gi"}
    # A GPU requested as well went from the limits only: Kubernetes refuses a request without its limit.
    requested = {"requests": {"cpu": "1", "nvidia.com/gpu": 1}, "limits": {"memory": "4Gi", "nvidia.com/gpu": 1}}
    resources = rendered(chart_renderer, device="cpu", resources=requested)["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    # Merged with the defaults, as Helm does: a default memory request of 8Gi, above this limit, was
    # refused by Kubernetes ("must be less than or equal to memory limit").
    assert resources == {"requests": {"cpu": "1"}, "limits": {"memory": "4Gi"}}
    # The pod numbers its GPUs from 0: cuda:1 on the one GPU it gets never ran.
    assert "the pod gets 1 GPU(s)" in render_chart(chart_renderer, device="cuda:1").stderr
    two = {"limits": {"nvidia.com/gpu": 2}}
    assert serve_arguments(rendered(chart_renderer, device="cuda:1", resources=two)["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]).device == "cuda:1"
    assert 'device must be "cpu", "cuda" or "cuda:N", got "mps"' in render_chart(chart_renderer, device="mps").stderr
    # Tainted GPU nodes and private registries: the standard values reach the pod.
    scheduling = {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                  "nodeSelector": {"accelerator": "h200"}, "imagePullSecrets": [{"name": "regcred"}],
                  "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                      {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}}
    placed = rendered(chart_renderer, **scheduling)["StatefulSet"]["spec"]["template"]["spec"]
    assert {key: placed[key] for key in scheduling} == scheduling

    # Production model files from a volume of the user's, beside the chart's own (alone and with a config).
    models = {"extraVolumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}],
              "extraVolumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}]}
    for extra in ({}, {"config": '[clip]\npath = "/models/clip"\n'}):
        spec = rendered(chart_renderer, **models, **extra)["StatefulSet"]["spec"]["template"]["spec"]
        assert models["extraVolumes"][0] in spec["volumes"] and len(spec["volumes"]) == 3 + bool(extra)  # with tmp and cache
        assert models["extraVolumeMounts"][0] in spec["containers"][0]["volumeMounts"]
    for name in ("data", "tmp", "cache", "callers"):
        refused = render_chart(chart_renderer, extraVolumes=[{"name": name, "emptyDir": {}}])
        assert refused.returncode != 0 and f'"{name}" is a volume name the chart uses' in refused.stderr

    # The user's environment variables beside the chart's own (an exporter's headers from a Secret).
    headers = {"name": "OTEL_EXPORTER_OTLP_HEADERS", "valueFrom": {"secretKeyRef": {"name": "otel", "key": "headers"}}}
    environment = rendered(chart_renderer, extraEnv=[headers])["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert environment == [{"name": "XDG_CACHE_HOME", "value": "/var/cache/explaind"}, {"name": "OMP_NUM_THREADS", "value": "2"}, headers]
    refused = render_chart(chart_renderer, extraEnv=[{"name": "XDG_CACHE_HOME", "value": "/cache"}])
    assert refused.returncode != 0 and "XDG_CACHE_HOME is the chart's own" in refused.stderr

    # The token, or named callers, from a Secret's key, mounted read-only where the flag reads it.
    for value, key, flag, other_flag in (("tokenSecret", "token", "token_file", "callers_file"),
                                         ("callersSecret", "callers", "callers_file", "token_file")):
        secured = rendered(chart_renderer, **{value: "explaind-auth"})["StatefulSet"]["spec"]["template"]["spec"]
        container = secured["containers"][0]
        path = Path(getattr(serve_arguments(container), flag))
        mount = next(mount for mount in container["volumeMounts"] if Path(mount["mountPath"]) == path.parent)
        volume = next(volume for volume in secured["volumes"] if volume["name"] == mount["name"])
        assert volume["secret"] == {"secretName": "explaind-auth", "items": [{"key": key, "path": path.name}]}, value
        assert mount["readOnly"] and getattr(serve_arguments(container), other_flag) is None, value
    refused = render_chart(chart_renderer, callersSecret="explaind-callers", tokenSecret="explaind-token")
    assert refused.returncode != 0 and "callersSecret and tokenSecret: give only one" in refused.stderr
    for secret, config in (("callersSecret", '[server]\ntoken = "s3cret"\n'), ("callersSecret", 'server.callers_file = "/c"\n'),
                           ("tokenSecret", '[server]\ncallers_file = "/c"\n')):
        refused = render_chart(chart_renderer, **{secret: "explaind-auth"}, config=config)
        assert refused.returncode != 0 and f"{secret} and a config that sets [server].token" in refused.stderr, (secret, config)
    assert render_chart(chart_renderer, callersSecret="explaind-callers", config='[server]\nadmins = ["ops"]\n').returncode == 0

    # TLS from a kubernetes.io/tls Secret; kubelet's plaintext gRPC probes ask the health port.
    tls = rendered(chart_renderer, tlsSecret="explaind-tls", tlsClientCertificates=True)["StatefulSet"]["spec"]["template"]["spec"]
    container = tls["containers"][0]
    arguments = serve_arguments(container)
    files = {Path(arguments.tls_cert_file), Path(arguments.tls_key_file), Path(arguments.tls_client_ca_file)}
    assert {file.name for file in files} == {"tls.crt", "tls.key", "ca.crt"}  # the keys of a kubernetes.io/tls Secret
    mount = next(mount for mount in container["volumeMounts"] if {Path(mount["mountPath"])} == {file.parent for file in files})
    assert mount["readOnly"] and {"name": mount["name"], "secret": {"secretName": "explaind-tls"}} in tls["volumes"]
    health = {port["name"]: port["containerPort"] for port in container["ports"]}["health"]
    assert arguments.health_port == health != 50051
    assert {container[probe]["grpc"]["port"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")} == {health}
    one_way = rendered(chart_renderer, tlsSecret="explaind-tls")["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    assert serve_arguments(one_way).tls_client_ca_file is None and serve_arguments(one_way).tls_cert_file
    moved = rendered(chart_renderer, tlsSecret="explaind-tls", healthPort=50060)["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    assert serve_arguments(moved).health_port == moved["livenessProbe"]["grpc"]["port"] == 50060
    for values, message in (({"tlsClientCertificates": True}, "tlsClientCertificates needs tlsSecret"),
                            ({"tlsSecret": "x", "config": '[server]\ntls_cert_file = "a.pem"\n'}, "set TLS with tlsSecret"),
                            ({"config": '[server]\ntls_cert_file = "a.pem"\n'}, "set TLS with tlsSecret"),
                            # TOML's other spellings of the same key.
                            ({"config": 'server.tls_cert_file = "a.pem"\n'}, "set TLS with tlsSecret"),
                            ({"config": 'server = { port = 50051, tls_key_file = "k.pem" }\n'}, "set TLS with tlsSecret"),
                            ({"config": '[server]\n"tls_cert_file" = "a.pem"\n'}, "set TLS with tlsSecret"),
                            ({"tlsSecret": "x", "healthPort": 50051}, "healthPort must be a free port"),
                            ({"tlsSecret": "x", "healthPort": 0}, "healthPort must be a free port")):
        refused = render_chart(chart_renderer, **values)
        assert refused.returncode != 0 and message in refused.stderr, values

    # Tracing to a collector: --otlp-endpoint, which the server checks as it does the config's key.
    collector = "http://otel-collector.monitoring:4317"
    for values in ({}, {"device": ""}):  # beside the other flags, and alone
        traced = rendered(chart_renderer, tracing={"otlpEndpoint": collector}, **values)["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
        assert serve_arguments(traced).otlp_endpoint == collector
    for endpoint in ("otel-collector:4317", "http://otel-collector:4317/v1/traces"):  # the server would refuse both at every start
        refused = render_chart(chart_renderer, tracing={"otlpEndpoint": endpoint})
        assert refused.returncode != 0 and "tracing.otlpEndpoint must be an OTLP/gRPC collector's URL" in refused.stderr, endpoint
    assert serve_arguments(default["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]).otlp_endpoint is None  # off: left to config

    refused = render_chart(chart_renderer, startupSeconds=5)
    assert refused.returncode != 0 and "startupSeconds must be a number of seconds, at least 10" in refused.stderr
    # The server would refuse both at start-up and the pod would restart in a loop.
    refused = render_chart(chart_renderer, tokenSecret="explaind-token", config='[server]\n  token = "s3cret"\n')
    assert refused.returncode != 0 and "tokenSecret and a config that sets [server].token" in refused.stderr
    assert render_chart(chart_renderer, tokenSecret="explaind-token", config='[server]\nmax_workers = 8  # no token = here\n').returncode == 0
    for spelling in ('server.token_file = "/t"\n', "server = { token = 's3cret' }\n", '[server]\n"token" = "s3cret"\n'):
        refused = render_chart(chart_renderer, tokenSecret="explaind-token", config=spelling)
        assert refused.returncode != 0 and "tokenSecret and a config that sets [server].token" in refused.stderr, spelling
    assert render_chart(chart_renderer, config='[server]\n# tls_cert_file = "a.pem"\n').returncode == 0
    refused = render_chart(chart_renderer, config='server = {tls_cert_file="a.pem", tls_key_file="k.pem"}\n')
    assert refused.returncode != 0 and "set TLS with tlsSecret" in refused.stderr
    # Other sections' keys of the same names are theirs: a factory's Hugging Face token, a client's TLS option.
    for other in ('[classifier]\nfactory_kwargs = { repo = "x", token = "hf_x", tls_verify = false }\n',
                  '[classifier]\nfactory_kwargs.token = "hf_x"\n', '[classifier]\nname = "a token = b"\n'):
        assert render_chart(chart_renderer, tokenSecret="explaind-token", config=other).returncode == 0, other


def test_helm_chart_probes_ask_the_health_port_in_every_install(chart_renderer):
    """On the gRPC port a probe's Check waits behind busy workers (1 s, kubelet's default
    timeout, with the one worker of max_workers = 1 held by a WaitOperation; the health
    port answered in 3 ms) and past [server].max_concurrent_rpcs is refused: an overloaded
    server failed its liveness probe and was restarted, its models loaded again. Only a
    TLS install asked the health port, which has threads of its own."""
    for values in ({}, {"device": "cpu"}, {"device": ""}, {"tokenSecret": "explaind-token"}, {"tlsSecret": "explaind-tls"},
                   {"healthPort": 50060}):
        container = rendered(chart_renderer, **values)["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        health_port = serve_arguments(container).health_port
        assert health_port == ports["health"] == values.get("healthPort", 50052) and health_port not in (ports["grpc"], ports["metrics"]), values
        probes = [container[probe] for probe in ("startupProbe", "readinessProbe", "livenessProbe")]
        assert [probe["grpc"]["port"] for probe in probes] == [health_port] * 3, values
        # A kill decision waits 5 s for an answer, not kubelet's default 1 s, three times in a row.
        assert container["livenessProbe"]["timeoutSeconds"] >= 5 and container["livenessProbe"]["failureThreshold"] >= 3, values


def test_helm_chart_gives_the_pod_time_for_the_servers_whole_shutdown(chart_renderer):
    """Jobs get [server].grace_period_s at SIGTERM, aborted ones up to ABORTED_JOBS_WAIT_S
    more, calls FINAL_STATE_MARGIN_S more: a config whose grace outlasted
    terminationGracePeriodSeconds rendered, and Kubernetes killed the server mid-shutdown."""
    from explaind.config import ServerSection
    from explaind.service.server import ABORTED_JOBS_WAIT_S, FINAL_STATE_MARGIN_S

    values = yaml.safe_load((DEPLOY / "helm" / "explaind" / "values.yaml").read_text())
    assert values["terminationGracePeriodSeconds"] >= ServerSection.grace_period_s + ABORTED_JOBS_WAIT_S + FINAL_STATE_MARGIN_S
    for config in ('[server]\ngrace_period_s = 60\n', 'server.grace_period_s = 60.5\n', 'server = { port = 50051, grace_period_s = 60 }\n',
                   '[server]\n"grace_period_s" = 11\n', '[server]\ngrace_period_s = 1e2\n', '[server]\ngrace_period_s = +60\n',
                   '[server]\ngrace_period_s = 1_00\n',  # TOML's other ways to write a number: the digits before the "e", "+" or "_" alone passed
                   '[server]\ngrace_period_s = 0x3c\n', '[server]\ngrace_period_s = 0o74\n', '[server]\ngrace_period_s = 0b111100\n'):  # and the "0" before the x, o or b
        grace = float(tomllib.loads(config)["server"]["grace_period_s"])  # as the server reads it
        refused = render_chart(chart_renderer, config=config)
        assert refused.returncode != 0 and f"terminationGracePeriodSeconds (45) must be at least config's [server].grace_period_s ({grace:g})" in refused.stderr, config
        shutdown = grace + ABORTED_JOBS_WAIT_S + FINAL_STATE_MARGIN_S
        pod = rendered(chart_renderer, config=config, terminationGracePeriodSeconds=math.ceil(shutdown) + 4)["StatefulSet"]["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > shutdown, config
    for config in ('[server]\ngrace_period_s = 10\n', '[server]\ngrace_period_s = 0.5\n', '[server]\n# grace_period_s = 60\n',
                   '[server]\nmax_workers = 60  # grace_period_s = 60\n'):
        assert render_chart(chart_renderer, config=config).returncode == 0, config


def test_helm_chart_gives_torch_as_many_threads_as_the_pod_has_cpus(chart_renderer):
    """torch took one intra-op thread per core of the node (a GPU node's 64 or more, beside
    a request of 2 CPUs) in each RPC thread that resized images, and a pod moved to a node of
    another size summed floats in another order. OMP_NUM_THREADS is the pod's CPU limit,
    else its request, rounded up; the user's own (extraEnv) replaces it."""
    def threads(**values: object) -> list[str]:
        container = rendered(chart_renderer, **values)["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
        return [variable.get("value") for variable in container["env"] if variable["name"] == "OMP_NUM_THREADS"]

    assert threads() == ["2"]  # values.yaml's request
    assert threads(resources={"requests": {"cpu": "500m"}}) == ["1"]
    assert threads(resources={"requests": {"cpu": 3}}) == ["3"]
    assert threads(resources={"limits": {"cpu": "2500m"}}) == ["3"]  # the limit, over the request's 2
    assert threads(resources={"requests": {"cpu": "1.5"}, "limits": {"cpu": "4"}}) == ["4"]
    assert threads(resources={"requests": {"cpu": None}}) == []  # nothing to size it by: torch's default
    assert threads(extraEnv=[{"name": "OMP_NUM_THREADS", "value": "8"}]) == ["8"]


def test_helm_chart_brings_the_default_cpu_request_down_to_a_smaller_limit(chart_renderer):
    """A limit of 500m merged with values.yaml's request of 2 CPUs: Kubernetes refuses a
    request above its limit. A larger limit, or a request of the user's under it, stays."""
    def resources(**cpu: object) -> dict:
        given = {part: {"cpu": amount} for part, amount in cpu.items()}
        return rendered(chart_renderer, device="cpu", resources=given)["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]["resources"]

    assert resources(limits="500m") == {"requests": {"cpu": "500m"}, "limits": {"cpu": "500m", "memory": "16Gi"}}
    assert resources(limits=1)["requests"] == {"cpu": 1}
    assert resources(requests="1500m", limits="1")["requests"] == {"cpu": "1"}
    assert resources(limits="2.5")["requests"] == {"cpu": "2"}
    assert resources(requests="250m", limits="500m")["requests"] == {"cpu": "250m"}
    assert resources(requests=0.5, limits="500m")["requests"] == {"cpu": 0.5}  # equal: kept as written


def test_helm_chart_passes_admins_to_serve_only_beside_named_callers(chart_renderer):
    # Admins could be set through the config value alone, and a name the server refuses
    # (or admins without callers) would restart the pod in a loop.
    from explaind.config import CALLER_NAME

    def container(**values: object) -> dict:
        return rendered(chart_renderer, **values)["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]

    assert serve_arguments(container()).admins is None  # left to config
    for callers in ({"callersSecret": "explaind-callers"}, {"config": '[server]\ncallers_file = "/c"\n'},
                    {"config": 'server = { callers_file = "/c" }\n'}, {"device": "", "config": 'server.callers_file = "/c"\n'}):
        assert serve_arguments(container(admins=["platform", "ops"], **callers)).admins == ["platform", "ops"], callers
    for values in ({}, {"tokenSecret": "explaind-token"}, {"config": '[server]\nmax_workers = 8  # callers_file = "/c"\n'}):
        refused = render_chart(chart_renderer, admins=["ops"], **values)
        assert refused.returncode != 0 and "admins names callers of a callers file: set callersSecret" in refused.stderr, values
    for config in ('[server]\nadmins = ["platform"]\n', 'server.admins = ["platform"]\n', 'server = { callers_file = "/c", admins = [] }\n'):
        refused = render_chart(chart_renderer, admins=["ops"], callersSecret="explaind-callers" if "callers_file" not in config else "", config=config)
        assert refused.returncode != 0 and "admins and a config that sets [server].admins: give only one" in refused.stderr, config
    refused = render_chart(chart_renderer, admins="ops", callersSecret="explaind-callers")
    assert refused.returncode != 0 and "admins must be a list of caller names" in refused.stderr
    # The chart takes the names the server does: its pattern is explaind.config's.
    assert f'"^{CALLER_NAME.pattern}$"' in (DEPLOY / "helm" / "explaind" / "templates" / "statefulset.yaml").read_text()
    for name in ("ops", "ci.bot-2", "Ops", "-ops", "o" * 65, "ops team"):
        accepted = render_chart(chart_renderer, admins=[name], callersSecret="explaind-callers")
        assert (accepted.returncode == 0) == bool(CALLER_NAME.fullmatch(name)), name
        assert accepted.returncode == 0 or f"admins: {json.dumps(name)} is no caller name" in accepted.stderr, name


def test_helm_chart_keeps_the_download_cache_on_a_volume_claim_when_asked(chart_renderer):
    """XDG_CACHE_HOME's emptyDir is refilled at each pod start (open_clip, hub models);
    cache.persistent makes it a second claim of the StatefulSet, mounted at the same path."""
    def claims_volumes_and_mount(**values: object) -> tuple[dict, dict, dict]:
        spec = rendered(chart_renderer, **values)["StatefulSet"]["spec"]
        container = spec["template"]["spec"]["containers"][0]
        cache_home = next(variable["value"] for variable in container["env"] if variable["name"] == "XDG_CACHE_HOME")
        mount = next(mount for mount in container["volumeMounts"] if mount["mountPath"] == cache_home)
        return ({claim["metadata"]["name"]: claim["spec"] for claim in spec["volumeClaimTemplates"]},
                {volume["name"]: volume for volume in spec["template"]["spec"]["volumes"]}, mount)

    claims, volumes, mount = claims_volumes_and_mount()
    assert list(claims) == ["data"] and volumes[mount["name"]] == {"name": "cache", "emptyDir": {"sizeLimit": "10Gi"}}
    assert claims_volumes_and_mount(cache={"size": "30Gi"})[1]["cache"]["emptyDir"] == {"sizeLimit": "30Gi"}
    assert claims_volumes_and_mount(tmpSize="512Mi")[1]["tmp"]["emptyDir"] == {"sizeLimit": "512Mi"}
    assert claims_volumes_and_mount(tmpSize="")[1]["tmp"]["emptyDir"] == {}  # unlimited, as asked
    for persistent in ({"persistent": True}, {"persistent": True, "size": "30Gi", "storageClass": "fast-ssd"}):
        claims, volumes, mount = claims_volumes_and_mount(cache=persistent)
        assert list(claims) == ["data", "cache"] and mount["name"] == "cache" and "cache" not in volumes, persistent
        assert claims["cache"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": persistent.get("size", "10Gi")}},
                                   **({"storageClassName": "fast-ssd"} if "storageClass" in persistent else {})}
        assert claims["data"] == claims_volumes_and_mount()[0]["data"]  # the store's claim as it was
    assert claims_volumes_and_mount(persistence={"storageClass": "slow"})[0]["data"]["storageClassName"] == "slow"


def test_helm_templates_read_only_values_the_chart_defines():
    chart = DEPLOY / "helm" / "explaind"
    values = yaml.safe_load((chart / "values.yaml").read_text())
    used = {path for template in (chart / "templates").glob("*.yaml") for path in re.findall(r"\.Values\.([\w.]+)", template.read_text())}
    assert "image.repository" in used
    for path in used:
        node = values
        for key in path.split("."):
            assert isinstance(node, dict) and key in node, f".Values.{path} is not in values.yaml"
            node = node[key]


def evaluated_at(rule: dict) -> float:
    """A rule's lastEvaluation (RFC 3339, nanoseconds, any zone) as epoch seconds."""
    stamp = re.sub(r"(\.\d{6})\d*", r"\1", rule["lastEvaluation"]).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


class Prometheus:
    """Debian's prometheus on a loopback port, with the shipped config pointed at ``target``
    and sped up (scrapes and rule evaluations every 250 ms) and compose's features (the exemplar
    store); its HTTP API answers the queries."""

    def __init__(self, root: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus is not installed (make test installs Debian's)")
        config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "250ms", "evaluation_interval": "250ms"}
        config["rule_files"] = [str(DEPLOY / rules) for rules in config["rule_files"]]
        config["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = root / "prometheus.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(  # TZ: its API's times (lastEvaluation) in UTC, whatever the machine's zone
                [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'tsdb'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}",
                 *[flag for flag in prometheus_command() if flag.startswith("--enable-feature=")]], stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "TZ": "UTC"})
        self.wait_until(lambda: self._get("/-/ready") is not None, "ready")

    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.read()
        except OSError:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            return None

    def api(self, path: str, **params: str) -> object:
        body = json.loads(self._get(f"/api/v1/{path}?{urllib.parse.urlencode(params)}"))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[float]:
        """The values of an instant query's vector, now."""
        return [float(sample["value"][1]) for sample in self.api("query", query=expr)["result"]]

    def wait_until(self, condition, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"Prometheus: not {what} in {timeout} s\n{self.log.read_text()[-3000:]}"
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def test_a_real_prometheus_shows_every_panel_and_alerts_only_when_the_server_is_down(server_factory, world_images, tmp_path):
    server = server_factory()
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{server.metrics_port}")
    try:
        prometheus.wait_until(lambda: prometheus.query('up{job="explaind"}') == [1.0], "scraping the server")
        images, labels = world_images
        with Client(server.target, timeout=60) as client:
            # The classifier gets these right; labels shifted by one make every sample a mistake.
            client.create_sample_set(images.numpy(), ((labels + 1) % 6).numpy(), sample_set_id="probe")
            # Two rounds, each scraped: a rate needs a series to grow between two samples.
            for round_ in (1, 2):
                client.predict(images[:8])
                # A 1024² float16 tensor reserves decode memory (18 MiB, over the 16 taken
                # unreserved), so its wait for room is timed.
                client.predict(np.full((3, 1024, 1024), 0.5, dtype=np.float16))
                client.rank_mistake_neurons("probe", 0, execution="operation")
                operation = client.visualize_neurons([3], method="no_clip", steps=2)
                operation.result()
                client.delete_operation(operation.name)
                prometheus.wait_until(lambda: prometheus.query('explaind_operations_deleted_total{reason="request"}') == [float(round_)],
                                      f"scraping round {round_}")
        for title, expr in dashboard_queries():
            values = prometheus.query(expr)
            assert any(math.isfinite(value) for value in values), f"{title}: no data from {expr!r}: {values}"
        for variable, name, label in dashboard_variable_labels():  # Grafana offers the values set above
            offered = {sample["metric"][label] for sample in prometheus.api("query", query=name)["result"]}
            assert DASHBOARD_VARIABLES[variable] in offered, (variable, offered)
        assert 0 < prometheus.query(dict(dashboard_queries())["Predict latency p50 / p99"])[0] < 60
        # Every rule evaluates without error, and none holds on a healthy server (once the
        # rules have seen the last scrape: evaluated in a later second).
        after = time.time() + 1
        prometheus.wait_until(lambda: all(evaluated_at(rule) >= after for group in prometheus.api("rules")["groups"]
                                          for rule in group["rules"]), "evaluating the rules")
        rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        assert {rule["name"] for rule in rules} == {rule["alert"] for rule in alert_rules()}
        assert all(rule["health"] == "ok" for rule in rules), rules
        usage = shutil.disk_usage(server.data_dir)  # a nearly full disk here rightly has its alert
        full = {"ExplaindDataDirFull"} if usage.free / usage.total < 0.05 else set()
        assert {alert["labels"]["alertname"] for alert in prometheus.api("alerts")["alerts"]} == full
        server.kill()
        prometheus.wait_until(lambda: {alert["labels"]["alertname"] for alert in prometheus.api("alerts")["alerts"]} - full == {"ExplaindDown"},
                              "alerting that the server is down")
    finally:
        prometheus.stop()


def test_a_real_prometheus_keeps_the_exemplars_of_a_traced_server_for_each_latency_panel(world_images, classifier_dir, tmp_path):
    """The panels' exemplar queries return the ids of the traces of the calls and jobs timed."""
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from explaind.config import default_config
    from explaind.service import ExplaindServer

    exporter = InMemorySpanExporter()
    config = (default_config().replace("classifier", path=str(classifier_dir)).replace("clip", path="").replace("diffusion", path="")
              .replace("server", port=0, metrics_port=free_port(), data_dir=str(tmp_path / "data"), data_dir_reserve_bytes=1 << 20)
              .replace("tracing", otlp_endpoint="http://127.0.0.1:4317"))  # never reached: the spans go to the exporter
    server = ExplaindServer(config, span_exporter=exporter)
    port = server.start()
    server.load_models()
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{server.metrics_port}")
    try:
        images, labels = world_images
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            client.predict(images[:4])
            sample_set = client.create_sample_set(images[:4].numpy(), labels[:4].numpy(), sample_set_id="exemplars")
            client.evaluate_sample_set(sample_set.sample_set_id).result(download=False)
            client.rank_mistake_neurons(sample_set.sample_set_id, int(labels[0]), execution="inline")  # an explanation RPC
        traced = {f"{span.context.trace_id:032x}" for span in exporter.get_finished_spans()}

        def exemplar_trace_ids(expr: str) -> set[str]:
            found = prometheus.api("query_exemplars", query=expr, start=str(time.time() - 300), end=str(time.time() + 60))
            return {exemplar["labels"]["trace_id"] for series in found for exemplar in series["exemplars"]}

        for title, expr in dashboard_queries(exemplars=True):
            prometheus.wait_until(lambda: exemplar_trace_ids(expr), f"keeping exemplars for {title}: {expr}")
            assert exemplar_trace_ids(expr) <= traced, title
    finally:
        prometheus.stop()
        server.stop(0)

"""docs/configuration.md stays in step with explaind.config: one table row per key of
every section, each row a real key, and each row's default the dataclass's; so do the
defaults other prose states beside a key, and the config module's example."""

import dataclasses
import re
from pathlib import Path

from explaind.config import Config

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "configuration.md"


def _sections() -> dict[str, object]:
    """Config's sections, from the dataclass itself: name -> default section instance."""
    return {f.name: f.default for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default)}


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _key_tables(text: str) -> dict[str, dict[str, str]]:
    """Each `## [section]`'s key table (header `| key | default | meaning |`): key -> its
    default cell. Other tables (a section's loaders, say) are not key tables."""
    tables: dict[str, dict[str, str]] = {}
    section, in_key_table = None, False
    for line in text.splitlines():
        if heading := re.fullmatch(r"## \[(\w+)\]", line.strip()):
            section, in_key_table = heading[1], False
            assert section not in tables, f"docs/configuration.md has two ## [{section}] headings"
            tables[section] = {}
        elif line.startswith("## "):
            section, in_key_table = None, False
        elif line.startswith("|"):
            cells = _cells(line)
            if cells[0] == "key":
                assert section is not None, f"a key table outside any ## [section]: {line!r}"
                assert cells == ["key", "default", "meaning"], f"[{section}]'s key table header: {line!r}"
                in_key_table = True
            elif in_key_table and not set(cells[0]) <= set("-: "):
                key = re.fullmatch(r"`(\w+)`", cells[0])
                assert key, f"[{section}]: a row's first cell must be one `key`, got {cells[0]!r}"
                assert key[1] not in tables[section], f"[{section}].{key[1]} has two rows"
                tables[section][key[1]] = cells[1]
        else:
            in_key_table = False
    return tables


def _default_shown(value: object, cell: str) -> bool:
    """Whether a row's default cell states the dataclass default ``value``."""
    if value is None:
        return cell.startswith("unset")
    if isinstance(value, str):
        return cell.startswith('`""`') or cell.startswith('""') if value == "" else f"`{value}`" in cell or f'"{value}"' in cell
    if isinstance(value, (tuple, list)) and not value:
        return cell.startswith("`[]`")
    if isinstance(value, dict) and not value:
        return cell.startswith("`{}`")
    if isinstance(value, bool):  # before int, which it is: TOML's spelling
        return cell.startswith(f"`{str(value).lower()}`")
    if isinstance(value, (int, float)):
        number = int(value) if float(value).is_integer() else value
        shown = {f"`{number}`", f"{number} "}
        if isinstance(value, int) and value and value % 2**20 == 0:
            shown |= {f"{value // 2**20} MiB", f"{value // 2**20} Mi"}
        return any(cell.startswith(form) for form in shown)
    raise AssertionError(f"no rule for a default of type {type(value).__name__}")


def test_every_config_key_has_one_row_in_its_sections_table_and_every_row_is_a_key():
    tables = _key_tables(REFERENCE.read_text())
    sections = _sections()
    assert set(tables) == set(sections), f"## [section] headings {sorted(tables)}, config sections {sorted(sections)}"
    for name, default in sections.items():
        keys = [f.name for f in dataclasses.fields(default)]
        missing = [key for key in keys if key not in tables[name]]
        unknown = [key for key in tables[name] if key not in keys]
        assert not missing, f"docs/configuration.md [{name}] has no row for {missing}"
        assert not unknown, f"docs/configuration.md [{name}] has rows for {unknown}, which are no keys of [{name}]"


def test_every_rows_default_is_the_dataclasss():
    tables = _key_tables(REFERENCE.read_text())
    wrong = [
        f"[{name}].{f.name}: row says {tables[name][f.name]!r}, the dataclass {getattr(default, f.name)!r}"
        for name, default in _sections().items()
        for f in dataclasses.fields(default)
        if f.name in tables.get(name, {}) and not _default_shown(getattr(default, f.name), tables[name][f.name])
    ]
    assert not wrong, "\n".join(wrong)


def test_every_bound_a_rows_default_cell_states_is_the_configs():
    # "`10`, at most 86400": a bound the table states must be the one load_config enforces.
    from explaind import config

    tables = _key_tables(REFERENCE.read_text())
    stated = {f"{section}.{key}": float(most[1]) for section, rows in tables.items() for key, cell in rows.items()
              if (most := re.search(r"at most ([\d.]+)", cell))}
    assert {"server.grace_period_s", "classifier.image_size", "classifier.resize_size"} <= set(stated), stated
    wrong = [f"[{key.replace('.', '].', 1)} stated at most {most:g}, the config's {config._AT_MOST.get(key)}"
             for key, most in stated.items() if config._AT_MOST.get(key) != most]
    assert not wrong, "\n".join(wrong)


def _outside_code(text: str) -> list[str]:
    """``text``'s lines outside fenced code blocks (a list item's indented fence included):
    where GitHub renders headings and links."""
    lines, fence = [], None
    for line in text.splitlines():
        if marker := re.match(r" *(```|~~~)", line):
            fence = None if fence == marker[1] else fence or marker[1]
        elif fence is None:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, every character but letters, digits, ``_``,
    ``-`` and spaces dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for ``page``'s headings; a repeated one gets ``-1``, ``-2``."""
    anchors: set[str] = set()
    for line in _outside_code(page.read_text()):
        if heading := re.match(r" {0,3}#{1,6} +(.*?) *#* *$", line):
            slug = _slug(heading[1])
            anchor, repeat = slug, 0
            while anchor in anchors:
                repeat += 1
                anchor = f"{slug}-{repeat}"
            anchors.add(anchor)
    return anchors


def test_the_readme_points_at_the_reference():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    assert "(docs/configuration.md)" in section
    # Anchors the README links into must exist (GitHub's: lower case, spaces as hyphens).
    headings = _anchors(REFERENCE)
    for anchor in re.findall(r"\(docs/configuration\.md#([\w-]+)\)", readme):
        assert anchor in headings, f"README links docs/configuration.md#{anchor}, which has no such heading"
    for anchor in re.findall(r"\]\(#([\w-]+)\)", REFERENCE.read_text()):
        assert anchor in headings, f"docs/configuration.md links #{anchor}, which has no such heading"


def test_the_reload_timings_the_reference_gives_are_the_servers():
    # Operators time rotations by them: "within a second of a change", "kept its text 0.2 s".
    from explaind.service import auth

    text = " ".join(REFERENCE.read_text().split())
    assert "again within a second of a change" in text and auth.RECHECK_INTERVAL_S <= 1.0
    settle = re.search(r"taken only once it has kept its text ([\d.]+) s: at once if nothing wrote it in the ([\d.]+) s before, "
                       r"else once it reads the same again ([\d.]+) s later", text)
    assert settle and {float(value) for value in settle.groups()} == {auth.SETTLE_S}



def _prose_defaults() -> list[tuple[str, str, str, str]]:
    """Where the README, the other docs, the protos, the deploy files or the CLI's help
    state a key's default beside its name: (where, section, key, the value stated). The
    forms: "`[jobs].retention_days` (30)", "`[server].grace_period_s`, 10 by default",
    "(default: [server].port, 50051)", "[jobs].evaluate_batch_size (64 unless configured)"."""
    import argparse

    from explaind.client.cli import build_parser

    texts = {path.relative_to(ROOT).as_posix(): path.read_text()
             for pattern in ("README.md", "docs/*.md", "proto/explaind/v1/*.proto", "deploy/*.yml", "deploy/helm/explaind/values.yaml")
             for path in sorted(ROOT.glob(pattern))}
    commands = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)).choices
    texts |= {f"explaind {name} --help": command.format_help() for name, command in commands.items()}
    stated = []
    for where, text in texts.items():
        text = " ".join(text.replace("//", " ").replace("#", " ").split())  # across line breaks and comment markers
        for pattern in (r"\[(\w+)\]\.(\w+)`? \((\d[\d.]*)(?:\)| unless configured\))", r"\[(\w+)\]\.(\w+)`?, ([\w.]+) by default",
                        r"\(default: (?:the config's )?\[(\w+)\]\.(\w+), ([\w./]+?)(?:\)|,| = )"):
            stated += [(where, *match.groups()) for match in re.finditer(pattern, text)]
    return stated


def test_every_default_the_prose_states_beside_a_key_is_the_dataclasss():
    # Prose beyond the reference names defaults too ("`[jobs].retention_days` (30)", a
    # flag's "(default: [server].port, 50051)"): a changed default must change them all.
    sections = _sections()
    stated = _prose_defaults()
    assert {where for where, *_ in stated} >= {"README.md", "explaind serve --help", "explaind evaluate --help"}, stated
    wrong = []
    for where, section, key, value in stated:
        default = getattr(sections[section], key)
        if value in ("off", "none"):  # a key whose empty or zero default turns something off
            right = not default
        else:
            right = value == (default if isinstance(default, str) else f"{default:g}")
        if not right:
            wrong.append(f"{where}: [{section}].{key} stated as {value!r}, the dataclass's {default!r}")
    assert not wrong, "\n".join(wrong)


def test_the_config_modules_example_is_a_valid_config(tmp_path):
    # help(explaind.config) shows it to whoever writes a config from the code side.
    import textwrap

    import explaind.config
    from explaind.config import ignored_keys, load_config

    (tmp_path / "explaind.toml").write_text(textwrap.dedent(explaind.config.__doc__.split("Example::", 1)[1]))
    config = load_config(tmp_path / "explaind.toml")  # every key known, every value of its type and range
    assert (config.classifier.loader, config.classifier.resize_size, config.tracing.sample_ratio) == ("torchvision", 256, 0.1)
    assert ignored_keys(config) == []  # and each in force: a key of another loader would mislead its reader


def test_every_toml_example_in_the_docs_is_a_valid_config(tmp_path):
    # Copied into a file as they stand (a list item's indented, too): an unknown key or a
    # value out of range in one would stop the reader's server.
    import textwrap

    from explaind.config import ignored_keys, load_config

    examples = [(page.name, textwrap.dedent(block)) for page in sorted((ROOT / "docs").glob("*.md"))
                for _, block in re.findall(r"^( *)```toml\n(.*?)^\1```", page.read_text(), flags=re.S | re.M)]
    assert examples
    for number, (page, example) in enumerate(examples):
        (tmp_path / f"{number}.toml").write_text(example)
        config = load_config(tmp_path / f"{number}.toml")
        assert config.source.endswith(f"{number}.toml") and ignored_keys(config) == [], page


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_in_the_readme_and_docs_resolves():
    # The README's performance results moved to docs/performance.md: a link left pointing
    # at README.md#memory-of-a-visualisation would land a reader at the top of the README.
    broken, checked = [], 0
    for page in _pages():
        prose = re.sub(r"`[^`]*`", "", "\n".join(_outside_code(page.read_text())))  # inline code, across line breaks too
        for target in re.findall(r"\]\(<?([^)\s>]+)>?(?: \"[^\"]*\")?\)", prose):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            checked += 1
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading in {linked.relative_to(ROOT)})")
    assert checked > 30 and not broken, "\n".join(broken)


def _numbers(text: str) -> set[str]:
    """The numbers ``text`` states, as written: "1.04-1.08 ms" gives 1.04 and 1.08."""
    return set(re.findall(r"\d+(?:[.,]\d+)*", text))


def test_the_readmes_headline_results_are_numbers_of_the_subsections_they_link():
    # The README keeps one line per result and docs/performance.md the measurements: a
    # rerun that changes a subsection's numbers must change its headline too.
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Performance\n", 1)[1].split("\n## ", 1)[0]
    page = (ROOT / "docs" / "performance.md").read_text()
    subsections = {_slug(heading): text for heading, text in re.findall(r"^## ([^\n]+)\n(.*?)(?=^## |\Z)", page, flags=re.S | re.M)}
    headlines = re.findall(r"^- \[[^\]]+\]\(docs/performance\.md#([\w-]+)\): ([^\n]+)$", section, flags=re.M)
    assert len(headlines) >= len(subsections) > 10
    for anchor, line in headlines:
        assert anchor in subsections, f"README's Performance links docs/performance.md#{anchor}, which has no such subsection"
        missing = _numbers(line) - _numbers(subsections[anchor])
        assert not missing, f"README's headline for #{anchor} states {sorted(missing)}, which its subsection does not: {line}"
    assert set(subsections) <= {anchor for anchor, _ in headlines}, "a docs/performance.md subsection without a headline in the README"


def _cli_claims(text: str) -> list[tuple[str, list[str]]]:
    """The `explaind COMMAND ...` spans of ``text``, each alternative of the CLI synopsis's
    ``a | b | c`` on its own: (the command, its other words)."""
    claims = []
    for span in re.findall(r"`explaind ([^`]+)`", " ".join(text.split())):  # a span may cross a line break
        for alternative in span.split(" | "):
            command, *words = alternative.split()
            claims.append((command, words))
    return claims


def _cli_mismatches(claims: list[tuple[str, list[str]]]) -> list[str]:
    """What ``claims`` name that the CLI's parser lacks: a command, an option of that
    command, or an action (`operations get`, `sample-set create/append`)."""
    import argparse

    from explaind.client.cli import build_parser

    commands = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)).choices
    wrong = []
    for command, words in claims:
        if command.isupper():  # a placeholder: `explaind COMMAND --help`
            continue
        if command not in commands:
            wrong.append(f"explaind {command}: no such command")
            continue
        options = {option for action in commands[command]._actions for option in action.option_strings}
        wrong += [f"explaind {command} {word}: no such option" for word in words
                  if re.fullmatch(r"--[\w-]+", word.strip("[]")) and word.strip("[]") not in options]
        choices = [action.choices for action in commands[command]._actions if action.dest == "action"]
        if choices:  # the action words: the first word, and the /-separated ones ("NAME]/show/delete")
            named = [part for index, word in enumerate(words) if index == 0 or "/" in word for part in word.split("/")]
            wrong += [f"explaind {command} {action}: no such action" for part in named
                      for action in part.split("|") if re.fullmatch(r"[a-z]+", action) and action not in choices[0]]
    return wrong


def test_every_explaind_command_the_prose_names_is_one_the_cli_takes():
    # tests/test_readme.py runs the session block's commands; the prose names many more
    # (`explaind operations list --owner monitoring`, the CLI synopsis), which a renamed
    # option or action would leave pointing at nothing.
    claims = {page.name: _cli_claims(page.read_text()) for page in _pages()}
    assert sum(map(len, claims.values())) > 30 and claims["world.md"]
    wrong = [f"{page}: {mismatch}" for page, named in claims.items() for mismatch in _cli_mismatches(named)]
    assert not wrong, "\n".join(wrong)


def test_every_repository_file_and_test_the_prose_names_exists():
    # The docs send a reader to scripts, tests and deploy files by path, and to the test
    # that checks a claim by its name: a file or test renamed or removed leaves them at nothing.
    tests = {name for path in (ROOT / "tests").glob("*.py") for name in re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M)}
    missing = []
    for page in _pages():
        text = page.read_text()
        for path in set(re.findall(r"(?<![\w/$.-])((?:bench|clients|deploy|kernels|proto|server|tests)/[\w./*-]*\w)", text)):
            if path != "tests/test_x.py" and not list(ROOT.glob(path)):  # test_x: `TESTS=tests/test_x.py`, a placeholder
                missing.append(f"{page.name}: {path}")
        missing += [f"{page.name}: {name}" for name in set(re.findall(r"`(test_\w+)`", text)) - tests]
    assert not missing, "\n".join(sorted(missing))


def _unresolved_names(text: str) -> list[str]:
    """The Python and protobuf names ``text`` states that do not exist: a dotted
    `explaind.module.name` (file names such as explaind.toml, and span attributes, name
    no module and are left alone), and a `Class.attribute` of the SDK's, the methods' or
    the API's messages (`Operation.requested_again`, `PredictRequest.partial_failure`)."""
    import importlib
    import inspect
    import pkgutil

    import explaind
    import explaind.client
    import explaind.client.report
    import explaind.methods.neuroinspect
    import explaind.v1

    missing, absent = [], object()
    modules = {module.name for module in pkgutil.iter_modules(explaind.__path__)}
    for name in set(re.findall(r"\bexplaind(?:\.\w+)+(?![\w/])", text)):
        if name.split(".")[1] not in modules:
            continue
        parts = name.split(".")
        for index in range(len(parts), 1, -1):  # the longest module prefix, then attributes
            try:
                found: object = importlib.import_module(".".join(parts[:index]))
            except ImportError:
                continue
            for attribute in parts[index:]:
                found = getattr(found, attribute, absent)
            break
        if found is absent:
            missing.append(name)
    fields: dict[str, set[str]] = {}
    for module in pkgutil.iter_modules(explaind.v1.__path__):
        if module.name.endswith("_pb2"):
            descriptor = importlib.import_module(f"explaind.v1.{module.name}").DESCRIPTOR
            for message in descriptor.message_types_by_name.values():
                fields[message.name] = {field.name for field in message.fields}
    classes: dict[str, list[type]] = {}  # by name: the SDK's NeuronRanking and the methods' are two classes
    for module in (explaind.client, explaind.client.report, explaind.methods.neuroinspect):
        for name, value in vars(module).items():
            if inspect.isclass(value) and value not in classes.setdefault(name, []):
                classes[name].append(value)
    for owner, attribute in set(re.findall(r"`([A-Z]\w+)\.([a-z_]\w*)(?:\(\))?`", text)):
        if owner in classes:
            known = any(hasattr(each, attribute) or attribute in getattr(each, "__dataclass_fields__", {}) for each in classes[owner])
        elif owner in fields and owner != "Image":  # `Image.open` is Pillow's
            known = attribute in fields[owner]
        else:
            continue
        if not known:
            missing.append(f"{owner}.{attribute}")
    return missing


def test_every_module_function_field_and_attribute_the_prose_names_exists():
    # `explaind.world.clip.load_world_clip()`, `OperationMetadata.requested_again`,
    # `MistakeReport.visualization_largest_fit`: names a reader types or greps for.
    missing = [f"{page.name}: {name}" for page in _pages() for name in _unresolved_names(page.read_text())]
    assert not missing, "\n".join(sorted(missing))


def test_the_readmes_alert_table_is_the_alerts_deploy_ships():
    # An operator reads the table, not the rules: each shipped alert has its row, with its
    # severity, its threshold ("over 5 %", "over 0.5 s") and the minutes its condition must
    # hold ("for 10 min"), and no row is of an alert that is gone.
    import yaml

    rules = [rule for group in yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())["groups"] for rule in group["rules"]]
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(Explaind\w+)` (\([a-z]+\) \|[^\n]*)\|$", readme, flags=re.M))
    assert sorted(rows) == sorted(rule["alert"] for rule in rules)
    for rule in rules:
        row = rows[rule["alert"]]

        def states(quantity: str) -> bool:  # "5 %", not the tail of "15 %" or "0.5 %"
            return re.search(rf"(?<![\d.]){re.escape(quantity)}", row) is not None

        assert row.startswith(f"({rule['labels']['severity']}) |"), (rule["alert"], row)
        threshold = re.search(r"[<>] *([\d.]+)\s*$", rule["expr"])
        if threshold and (value := float(threshold[1])):  # "> 0" is "any", as the row says in words
            assert states(f"{value * 100:g} %") or states(f"{value:g} s"), (rule["alert"], value, row)
        held = int(rule["for"].removesuffix("m")) if "for" in rule else 0
        if held:
            assert states(f"{held} min"), (rule["alert"], rule["for"], row)
        if (threshold and not float(threshold[1])) or re.search(r"\(.*\)\s*unless\b", rule["expr"], flags=re.S):
            # An alert on "any" (a failure, a start) in a window: the row says how far back it
            # looks, the window plus the minutes the condition must hold ("none started in the
            # last 20").
            window = max(int(minutes) for minutes in re.findall(r"\[(\d+)m\]", rule["expr"]))
            assert re.search(rf"in the last {window + held}\b", row), (rule["alert"], window + held, row)


def test_the_readmes_count_of_gpu_tests_is_the_suites():
    # `make test-gpu` is run by hand on a lent GPU: the count tells its runner whether all
    # ran, so it is the tests pytest runs, each parameter of a parametrized test its own
    # (pytest's "14 passed"), not the functions marked.
    import subprocess
    import sys

    files = [f"tests/{path.name}" for path in sorted((ROOT / "tests").glob("test_*.py")) if "pytest.mark.gpu" in path.read_text()]
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu", *files],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    marked = sum("::" in line for line in listed.stdout.splitlines())
    assert listed.returncode == 0 and marked, listed.stdout + listed.stderr
    stated = re.search(r"the tests marked `gpu`, which `make test` skips without CUDA, (\d+) of them", " ".join((ROOT / "README.md").read_text().split()))
    assert stated and int(stated[1]) == marked, (stated and stated[1], marked)


def _stated_constants() -> list[str]:
    """The README's sentences that state a limit or period the code keeps as a constant,
    each with its number filled in from that constant."""
    from explaind import errors, imaging
    from explaind.client import _async, _client, _interrupted, _operations, cli, report
    from explaind.engine import core, neuroinspect
    from explaind.service import interceptors, server

    mib, kib = 2**20, 2**10
    in_words = {10: "ten", 60: "minute"}  # a changed constant has no word here: a KeyError, as a failure
    return [
        f"inline when the set has ≤ {neuroinspect.INLINE_MAX_SAMPLES} samples, the class ≤ {neuroinspect.INLINE_MAX_MISTAKES} mistakes",
        f"`group_attribute` takes at most {neuroinspect.MAX_EDIT_GROUPS} (class, value) groups",
        f"an image side over {imaging.MAX_IMAGE_SIDE} px",
        f"a JPEG of over {imaging.MAX_JPEG_SCANS} scans or {imaging.MAX_JPEG_MARKERS} markers",
        f"over {imaging.MAX_PNG_COMPRESSED_TEXT_CHUNKS} compressed text chunks or over {imaging.MAX_PNG_CHUNKS} chunks",
        f"a GIF of over {imaging.MAX_GIF_BLOCKS} extension blocks",
        f"a TIFF of over {imaging.MAX_TIFF_STRIPS} strips or tiles",
        f"cut to {interceptors.MAX_STATUS_MESSAGE_BYTES // kib} KiB, {interceptors.MAX_DETAILED_MESSAGE_BYTES // kib} KiB where the status carries details",
        f"At most {in_words[errors.MAX_PRECONDITION_VIOLATIONS]} violations are sent",
        f"each type and subject cut to {errors.MAX_VIOLATION_PART_BYTES} bytes",
        f"for {core.UNDECODABLE_SEARCH_SECONDS:g} s at most",
        f"a sweep every {in_words[int(server.SWEEP_INTERVAL_S)]} removes",
        f"reads large artifacts in ranges of at most {_operations.ARTIFACT_RANGE_BYTES // mib} MiB",
        f"up to `max_in_flight={_client.DEFAULT_PREDICT_IN_FLIGHT}` of them in flight",
        f"with backoff up to {_client.RETRY_MAX_BACKOFF_S:g} s",
        f"its own pool of `max_workers` threads ({_async.DEFAULT_MAX_WORKERS};",
        f"waits for a job in steps of {_async.RESULT_STEP_S:g} s",
        f"the CLI shows it above {cli.UPLOAD_PROGRESS_SAMPLES} samples",
        f"Text output names at most {cli._CLASSES_SHOWN} classes",
        f"then the {cli.CONFUSIONS_SHOWN} (true, predicted) pairs of the most mistakes",
        f"`operations list` shows the newest {cli.OPERATIONS_LISTED} (says so",
        f"ending `--timeout` + {cli.TERMINATED_GRACE_S:g} s after the signal",
        f"gets {_interrupted.RANKING_REPEAT_TIMEOUT_S:g} s at most",
        f"is waited for up to {report.CANCELLED_EDIT_WAIT_S:g} s",
    ]


def test_the_limits_and_periods_the_readme_states_are_the_codes():
    # "inline when the set has ≤ 4096 samples", "cut to 4 KiB": a reader sizes requests and
    # reads errors by them; a changed constant must change its sentence.
    prose = " ".join((ROOT / "README.md").read_text().split())
    wrong = [sentence for sentence in _stated_constants() if sentence not in prose]
    assert not wrong, "\n".join(wrong)


def test_docs_performance_md_names_every_bench_script():
    # The README sends a reader there for the bench measurements: one kept beside what it
    # bounds (decode memory, a ranking's stability cost) is pointed to from there.
    page = (ROOT / "docs" / "performance.md").read_text()
    unnamed = [script.name for script in sorted((ROOT / "bench").glob("[a-z]*.py")) if f"bench/{script.name}" not in page]
    assert not unnamed, f"docs/performance.md names no {unnamed}"


def test_the_readme_and_the_proto_list_every_capability_the_server_lists():
    # A client relies on a behaviour only where its capability is listed: one the server gains
    # ("requested_again") must be named where GetModelMetadata's capabilities are described.
    from explaind.service.convert import CAPABILITIES

    prose = " ".join((ROOT / "README.md").read_text().split())
    described = re.search(r"`capabilities`, what it (.*?)\), `EvaluateSampleSet`", prose)
    assert described, "the README's description of GetModelMetadata's capabilities moved"
    assert sorted(re.findall(r"`(\w+)`(?:: | on )", described[1])) == sorted(CAPABILITIES), described[1]
    proto = (ROOT / "proto" / "explaind" / "v1" / "inference.proto").read_text()
    comment = re.search(r"((?:  //.*\n)+)  repeated string capabilities = 5;", proto)
    assert comment, "the proto's comment on GetModelMetadataResponse.capabilities moved"
    described = " ".join(line.strip().removeprefix("//").strip() for line in comment[1].splitlines())
    assert sorted(re.findall(r'"(\w+)" \(', described)) == sorted(CAPABILITIES), described

"""The README's in-process example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_in_process_example_runs_as_written(capsys):
    section = README.read_text().split("## The methods in-process", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and all(re.fullmatch(r"neuron \d+: (insufficient|excessive|both) in \d+% of \d+ mistakes", line) for line in printed[:3])
    edit = namespace["edit"]
    assert edit.after.worst_group[1] > edit.before.worst_group[1]  # the example's point: the edit repairs the worst group
    assert namespace["images"].shape == (1, 3, 64, 64) and 0 <= namespace["images"].min() and namespace["images"].max() <= 1


def test_the_production_config_is_a_valid_config(tmp_path):
    from explaind.config import load_config

    (block,) = re.findall(r"```toml\n(.*?)```", README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0], flags=re.S)
    (tmp_path / "explaind.toml").write_text(block)
    config = load_config(tmp_path / "explaind.toml")  # every key known, every value of its type and range
    assert config.classifier.loader == "export" and config.server.tls_cert_file and config.server.health_port

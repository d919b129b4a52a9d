"""The backup procedure docs/configuration.md describes, run against a live server and restored."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ServerProcess, write_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _documented_commands() -> tuple[str, str]:
    """The backup and the restore shell blocks of the Backups section, as documented."""
    section = DOC.read_text().split("### Backups", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 2, blocks
    return blocks[0], blocks[1]


def _sh(script: str, tmp_path: Path, **env: str) -> None:
    bin_dir = tmp_path / "bin"  # `python` as the image has it: this interpreter
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "python").exists():
        (bin_dir / "python").symlink_to(sys.executable)
    subprocess.run(["bash", "-euc", script], check=True, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env})


def test_documented_live_backup_restores_sets_operations_and_active_head(tmp_path: Path, classifier_dir: Path,
                                                                          world_images) -> None:
    from explaind.client import AbortedError, Client

    backup, restore = _documented_commands()
    images, labels = world_images[0].numpy(), world_images[1].tolist()
    config = write_config(tmp_path / "explaind.toml", classifier_dir)
    server = ServerProcess(config, tmp_path / "data", tmp_path / "server.log").start()
    try:
        with Client(server.target, timeout=60) as client:
            client.create_sample_set(images, labels, sample_set_id="train")
            evaluation = client.evaluate_sample_set("train").wait()
            edit = client.edit_head("train", 0, [1, 2, 3], promote=True).wait()
            assert edit.state == "succeeded", edit.error
            before = client.predict(images[:4])
            client.create_sample_set(list(images) * 10, labels * 10, sample_set_id="big")
            running = client.edit_head("big", 1, [4, 5], max_epochs=1000, patience=1000)
            deadline = time.monotonic() + 60
            while running.refresh().state != "running":
                assert time.monotonic() < deadline, running.state
                time.sleep(0.05)
            _sh(backup, tmp_path, DATA_DIR=str(server.data_dir), BACKUP=str(tmp_path / "backup"))
            assert running.refresh().state == "running"  # taken while the job wrote
            running.cancel()
    finally:
        server.stop()
    moved = tmp_path / "elsewhere" / "data"  # a new mount point
    moved.mkdir(parents=True)
    _sh(restore, tmp_path, DATA_DIR=str(moved), BACKUP=str(tmp_path / "backup"))
    restored = ServerProcess(config, moved, tmp_path / "restored.log").start()
    try:
        with Client(restored.target, timeout=60) as client:
            assert {s.sample_set_id: s.sample_count for s in client.sample_sets()} == {"train": 48, "big": 480}
            assert client.operation(evaluation.name).result().mistake_count == evaluation.result().mistake_count
            versions = client.head_versions()
            assert [(v.version_id, v.active) for v in versions] == [("v0", False), ("v1", True)]
            assert [p.model_version for p in client.predict(images[:4])] == [p.model_version for p in before]  # the promoted head
            assert [q for p in client.predict(images[:4]) for q in p.probabilities] == pytest.approx([q for p in before for q in p.probabilities])
            interrupted = client.operation(running.name)
            assert interrupted.state == "failed"
            assert isinstance(interrupted.error, AbortedError)
            assert "stopped while this job was queued or running" in str(interrupted.error)
    finally:
        restored.stop()
    assert "ERROR" not in (tmp_path / "restored.log").read_text()

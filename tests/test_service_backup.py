"""The backup procedure docs/configuration.md describes, run against a live server and restored."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
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


def _held_at_its_first_epoch(editor: type, held: threading.Event, released: threading.Event) -> type:
    """``editor`` (HeadEditor) whose edit, once its first epoch is reported, sets ``held``
    and waits there until ``released``: a job running however fast the machine trains."""

    class HeldEditor(editor):
        def edit(self, *args, callback_on_epoch_end, **kwargs):
            def holding(*epoch):
                stop = callback_on_epoch_end(*epoch)
                held.set()
                released.wait(120)
                return stop

            return super().edit(*args, callback_on_epoch_end=holding, **kwargs)

    return HeldEditor


def test_documented_live_backup_restores_sets_operations_and_active_head(tmp_path: Path, classifier_dir: Path,
                                                                          world_images, monkeypatch) -> None:
    from explaind.client import AbortedError, Client
    from explaind.config import load_config
    from explaind.engine import neuroinspect as engine_module
    from explaind.service import ExplaindServer

    backup, restore = _documented_commands()
    images, labels = world_images[0].numpy(), world_images[1].tolist()
    config = write_config(tmp_path / "explaind.toml", classifier_dir)
    data_dir = tmp_path / "data"
    # In this process, for its edit to be held running while the backup is taken.
    server = ExplaindServer(load_config(config).replace("server", port=0, metrics_port=0, data_dir=str(data_dir)))
    held, released = threading.Event(), threading.Event()
    try:
        target = f"127.0.0.1:{server.start()}"
        server.load_models()
        with Client(target, timeout=60) as client:
            client.create_sample_set(images, labels, sample_set_id="train")
            evaluation = client.evaluate_sample_set("train").wait()
            edit = client.edit_head("train", 0, [1, 2, 3], promote=True).wait()
            assert edit.state == "succeeded", edit.error
            before = client.predict(images[:4])
            client.create_sample_set(list(images) * 10, labels * 10, sample_set_id="big")
            monkeypatch.setattr(engine_module, "HeadEditor", _held_at_its_first_epoch(engine_module.HeadEditor, held, released))
            running = client.edit_head("big", 1, [4, 5])
            assert held.wait(60), running.refresh().state
            _sh(backup, tmp_path, DATA_DIR=str(data_dir), BACKUP=str(tmp_path / "backup"))  # taken while the job runs
            running.cancel()
    finally:
        released.set()
        server.stop(30)
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

"""The wheel (what `pip install .` and the container install) carries everything the
server needs at run time, not only what an editable checkout happens to have."""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_every_data_file_and_the_stubs(tmp_path):
    # From a copy without build/: setuptools reuses files an earlier build left there.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "var", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
                   check=True, timeout=600, capture_output=True)
    (wheel,) = tmp_path.glob("explaind-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # Every data file the packages hold in git (weights, configs, scenarios, stubs' .pyi)
    # must be installed: the code opens them by path next to itself.
    packaged_dirs = {"server/explaind/": "explaind/", "kernels/": "explaind/kernels/",
                     "clients/explaind/client/": "explaind/client/", "clients/explaind/v1/": "explaind/v1/"}
    tracked = subprocess.run(["git", "ls-files", *packaged_dirs], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout.split()
    data = {installed + path.removeprefix(source_dir) for path in tracked if not path.endswith(".py")
            for source_dir, installed in packaged_dirs.items() if path.startswith(source_dir)}
    assert "explaind/world/model_configs/world-clip-tiny.json" in data
    assert any(name.endswith(".safetensors") for name in data)
    assert data - names == set()
    assert {"explaind/v1/neuroinspect_pb2.py", "explaind/kernels/_onnx_runtime.py", "explaind/client/cli.py"} <= names
    assert "explaind/py.typed" in names  # without it a user's mypy ignores every annotation
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "explaind = explaind.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def _admitted_minors() -> set[int]:
    """The CPython 3 minor versions pyproject.toml's requires-python admits."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {minor for minor in range(0, 100) if f"3.{minor}" in SpecifierSet(project["requires-python"])}


def test_requires_python_admits_exactly_the_python_versions_the_classifiers_name():
    # The exact torch/torchvision pins have wheels for a bounded range of CPython minors
    # (and no sdist), so requires-python needs an upper bound: without one, pip on a newer
    # Python accepts the project and then fails on "no matching distribution for torch".
    admitted = _admitted_minors()
    assert admitted and max(admitted) < 99, "requires-python has no upper bound"
    assert admitted == set(range(min(admitted), max(admitted) + 1))
    prefix = "Programming Language :: Python :: 3."
    classifiers = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["classifiers"]
    classified = {int(c.removeprefix(prefix)) for c in classifiers if c.startswith(prefix)}
    assert classified == admitted


def test_make_refuses_a_venv_of_a_python_the_project_does_not_admit_saying_what_to_do(tmp_path):
    # macOS's python3 is 3.9 (Homebrew's may be newer than 3.13): pip refused the install
    # and left the venv, which `make demo PYTHON=python3.13` then reused and failed again.
    calls = tmp_path / "calls"
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    admitted = _admitted_minors()
    for minor in (min(admitted) - 1, min(admitted), max(admitted), max(admitted) + 1):
        # The venv's python: its version faked for make's check, anything else (pip) only recorded.
        python.write_text(f"#!/bin/sh\n[ \"$1\" = -c ] || {{ echo \"$*\" >> {calls}; exit 1; }}\n"
                          f"exec {sys.executable} -c \"import sys; sys.version_info = (3, {minor}, 0, 'final', 0); "
                          f"sys.version = '3.{minor}.0'\n$2\"\n")
        python.chmod(0o755)
        calls.unlink(missing_ok=True)
        done = subprocess.run(["make", "-s", f"VENV={tmp_path / 'venv'}", str(tmp_path / "venv" / ".installed")],
                              cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode != 0
        if minor in admitted:
            assert calls.read_text() == "-m pip install -e .[dev]\n", done.stderr
        else:
            assert f"venv is Python 3.{minor}.0; explaind needs 3.{min(admitted)} to 3.{max(admitted)}: rm -rf " in done.stderr
            assert not calls.exists()


def test_make_coverage_measures_every_source_root_but_the_generated_stubs():
    # A source root added to the distribution and not to [tool.coverage.run] would be
    # left out of `make coverage`'s report silently: its files never listed as missed.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    roots = set(config["setuptools"]["package-dir"].values())
    assert set(config["coverage"]["run"]["source"]) == roots - {"clients/explaind/v1"}
    assert all((ROOT / root).is_dir() for root in roots)


def test_the_sdk_and_its_cli_import_neither_torch_nor_the_server():
    """A client script or an `explaind` command pays only for what the SDK imports: it
    takes a torch tensor without importing torch, and shares explaind.exif with the
    server, which is numpy and Pillow only (explaind.imaging would bring torch: seconds)."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, explaind.client, explaind.client.cli; print(*sorted(sys.modules))"],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    assert "explaind.exif" in loaded
    assert not {"torch", "explaind.imaging", "explaind.service"} & set(loaded), sorted({"torch", "explaind.imaging", "explaind.service"} & set(loaded))


def test_starting_the_server_imports_none_of_the_libraries_only_some_requests_need():
    """Every server start (a pod's readiness, a restart) pays for what the server module
    imports: scipy.stats alone took about a quarter of it. Probing, CLIP, diffusion and
    ONNX Runtime load their libraries when first used."""
    lazy = ("scipy", "open_clip", "diffusers", "onnxruntime", "onnx")
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, explaind.service.server; print(*sorted({m.split('.')[0] for m in sys.modules}))"],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    assert "torch" in loaded and not set(lazy) & set(loaded), sorted(set(lazy) & set(loaded))

"""What a newcomer's fresh clone meets before any code runs: the Makefile's install, the package
metadata, the README's set-up notes."""

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def test_the_licence_is_an_spdx_expression():
    """PEP 639's `license = "MIT"`: setuptools' table form printed a deprecation banner per build."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["license"] == "MIT"
    # setuptools reads the SPDX form from 77 on
    assert project["build-system"]["requires"] == ["setuptools>=77"]


def make_dry_run(*variables: str) -> list[str]:
    """The torch install line `make` would run for a fresh .venv (-B: as if nothing were installed)."""
    result = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), ".venv/.installed-run", *variables],
                            capture_output=True, text=True, timeout=60, check=True)
    return [line for line in result.stdout.splitlines()
            if "pip install" in line and "torch==" in line and not line.lstrip().startswith("#")]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_torch_comes_from_the_cpu_index_only_when_asked():
    """PyPI's Linux torch is the CUDA build: TORCH_INDEX picks PyTorch's CPU wheels; by default the
    install uses pip's own indexes, so a machine that reaches only those keeps working."""
    (default,) = make_dry_run()
    assert "--index-url" not in default and "torch==2.13.0" in default
    (cpu,) = make_dry_run(f"TORCH_INDEX={CPU_INDEX}")
    assert cpu.endswith(f"torch==2.13.0 --index-url {CPU_INDEX}")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "The CPU wheel first" not in makefile  # the old comment, untrue on PyPI
    assert "PyPI's torch==2.13.0 is the CUDA build" in makefile


def test_readme_says_what_make_test_and_a_cpu_only_machine_need():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "apt-get install chromium" in readme and "browser tests" in readme
    assert f"make demo TORCH_INDEX={CPU_INDEX}" in readme

"""The package as users get it: a wheel built from the one file, installed in a fresh virtual
environment, that runs a job and gives type checkers its annotations; an sdist whose tests
can run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
from support import REPO

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def venv_python(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment (no system site-packages) with only the wheel and its
    dependencies installed."""
    return fresh_venv(sys.executable, next(dist.glob("*.whl")), tmp_path_factory.mktemp("venv"))


def test_the_sdist_holds_the_tests_their_helpers_and_the_licence(dist):
    with tarfile.open(next(dist.glob("*.tar.gz"))) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"sqliteq.py", "LICENSE", "pyproject.toml", "tests/conftest.py", "tests/support.py",
            "tests/workers.py", "tests/cli_app.py", "tests/coord_workers.py",
            "tests/faults/vfs.py", "examples/flask_app.py", "examples/asyncio_app.py"} <= names


def test_the_long_description_has_no_link_a_package_index_cannot_follow(dist):
    with zipfile.ZipFile(next(dist.glob("*.whl"))) as wheel:
        [metadata] = [name for name in wheel.namelist() if name.endswith("/METADATA")]
        description = wheel.read(metadata).decode().split("\n\n", 1)[1]
    assert "## Quick start" in description
    links = re.findall(r"\]\(([^)]*)\)", description)
    assert links and all(link.startswith(("#", "https://")) for link in links), links
    assert "bench/results.png" in description           # named, not linked


# A job, and an async one, from the installed package.
PROGRAM = textwrap.dedent("""
    import asyncio, sys, sqliteq
    assert sqliteq.__file__.endswith("site-packages/sqliteq/__init__.py"), sqliteq.__file__
    storage = sqliteq.Storage(sys.argv[1])
    rt = sqliteq.Runtime(storage, {"default": 1})
    rt.register("double", lambda ctx, payload: payload * 2)

    @rt.task(timeout=30)
    async def later(ctx, payload):
        await asyncio.sleep(0)
        return payload + 1

    with rt:
        job_id = storage.jobs.enqueue(sqliteq.EnqueueRequest("double", 21)).job_id
        print(storage.jobs.wait(job_id, timeout=30).result)
        print(storage.jobs.wait(later.enqueue(1).job_id, timeout=30).result)
""")


def fresh_venv(python: str | Path, wheel: Path, folder: Path) -> Path:
    """A virtual environment made by `python`, with only the wheel and its dependencies."""
    subprocess.run([str(python), "-m", "venv", str(folder)], check=True, timeout=120)
    subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return folder / "bin" / "python"


def interpreter(minor: int) -> str | None:
    """A Python 3.<minor> under pyenv or on PATH (not a pyenv shim), if this machine has one."""
    installed = sorted(Path.home().glob(f".pyenv/versions/3.{minor}.*/bin/python3"))
    if installed:
        return str(installed[-1])
    found = shutil.which(f"python3.{minor}")
    return None if found is None or "/shims/" in found else found


def test_the_wheel_in_a_fresh_environment_runs_a_job_and_the_cli(venv_python, tmp_path):
    ran = subprocess.run([str(venv_python), "-c", PROGRAM, str(tmp_path / "q.db")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (ran.returncode, ran.stdout.split()) == (0, ["42", "2"]), ran.stderr
    status = subprocess.run([str(venv_python.parent / "sqliteq"), "--db", str(tmp_path / "q.db"),
                             "status", "--json"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    listed = subprocess.run([str(venv_python.parent / "sqliteq"), "--help"],
                            capture_output=True, text=True, timeout=60).stdout
    assert " status " in listed and " bench " not in listed    # no bench/ beside a wheel


@pytest.mark.parametrize("minor", [10, 11, 12, 13])
def test_the_wheel_runs_on_every_supported_python_this_machine_has(dist, tmp_path, minor):
    if minor == sys.version_info.minor:
        pytest.skip("this Python: the test above installs the wheel into it")
    python = interpreter(minor)
    if python is None:
        pytest.skip(f"no Python 3.{minor} on this machine")
    venv = fresh_venv(python, next(dist.glob("*.whl")), tmp_path / "venv")
    ran = subprocess.run([str(venv), "-c", PROGRAM, str(tmp_path / "q.db")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert (ran.returncode, ran.stdout.split()) == (0, ["42", "2"]), ran.stderr


def test_mypy_reads_the_installed_types_and_flags_misuse(venv_python, tmp_path):
    (tmp_path / "user.py").write_text(textwrap.dedent("""
        import sqliteq

        storage = sqliteq.Storage("queue.db")
        ok: sqliteq.EnqueueOutcome = storage.jobs.enqueue(sqliteq.EnqueueRequest("email"))
        storage.jobs.enqueu(sqliteq.EnqueueRequest("email"))
        sqliteq.EnqueueRequest("email", priority="high")
    """))
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         f"--python-executable={venv_python}", "user.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    errors = [line for line in checked.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2, checked.stdout
    assert "user.py:6:" in errors[0] and '"Jobs" has no attribute "enqueu"' in errors[0]
    assert "user.py:7:" in errors[1] and 'incompatible type "str"' in errors[1]

"""scripts/find_python.sh, which quickstart.sh and .ci/run use to pick an interpreter:
run with fake interpreters on a PATH of their own."""

import os
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "find_python.sh")
BASH = "/bin/bash"


def fake_python(folder, name, version=None, venv=True):
    """An executable `name` in `folder`: it answers the version query with `version`
    (None: it fails as an inactive pyenv shim does) and the venv check with `venv`."""
    path = os.path.join(folder, name)
    if version is None:
        body = f'echo "pyenv: {name}: command not found" >&2; exit 127'
    else:
        body = (
            'case "$2" in\n'
            f'  *version_info*) echo "{version}" ;;\n'
            f"  *ensurepip*) exit {0 if venv else 1} ;;\n"
            "  *) exit 2 ;;\n"
            "esac"
        )
    with open(path, "w") as f:
        f.write(f"#!{BASH}\n{body}\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def find_python(folder, python=None):
    env = {"PATH": str(folder), "HOME": str(folder)}
    if python:
        env["PYTHON"] = python
    result = subprocess.run([BASH, SCRIPT], env=env, capture_output=True, text=True, timeout=30)
    return result.returncode, result.stdout.strip(), result.stderr.strip()


def test_takes_the_first_that_runs_skipping_an_inactive_shim(tmp_path):
    fake_python(tmp_path, "python3.12")  # a shim for a version pyenv has not activated
    fake_python(tmp_path, "python3.11", "3.11")
    fake_python(tmp_path, "python3.10", "3.10")
    assert find_python(tmp_path) == (0, str(tmp_path / "python3.11"), "")


def test_prefers_3_12(tmp_path):
    for version in ("3.12", "3.11", "3.10"):
        fake_python(tmp_path, f"python{version}", version)
    assert find_python(tmp_path)[:2] == (0, str(tmp_path / "python3.12"))


def test_python3_counts_when_it_is_a_supported_version(tmp_path):
    fake_python(tmp_path, "python3", "3.10")
    assert find_python(tmp_path)[:2] == (0, str(tmp_path / "python3"))


def test_a_version_without_venv_is_passed_over(tmp_path):
    fake_python(tmp_path, "python3.12", "3.12", venv=False)
    fake_python(tmp_path, "python3.11", "3.11")
    assert find_python(tmp_path)[:2] == (0, str(tmp_path / "python3.11"))


def test_only_3_13_stops_with_one_line_naming_the_versions_and_packages(tmp_path):
    fake_python(tmp_path, "python3.13", "3.13")
    fake_python(tmp_path, "python3", "3.13")
    fake_python(tmp_path, "python3.12")  # inactive shim
    code, out, err = find_python(tmp_path)
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1
    assert "3.10, 3.11 or 3.12" in err and "python3=3.13" in err
    assert "apt-get install python3.12 python3.12-venv" in err


def test_supported_version_without_venv_names_the_venv_package(tmp_path):
    fake_python(tmp_path, "python3.12", "3.12", venv=False)
    code, _, err = find_python(tmp_path)
    assert code == 1 and len(err.splitlines()) == 1 and "python3.12-venv" in err


@pytest.mark.parametrize(
    "version, venv, code, message",
    [
        ("3.10", True, 0, ""),
        ("3.13", True, 1, "is Python 3.13; reste-larq needs Python 3.10, 3.11 or 3.12"),
        ("3.11", False, 1, "apt-get install python3.11-venv"),
        (None, True, 1, "does not run"),
    ],
)
def test_python_override(tmp_path, version, venv, code, message):
    fake_python(tmp_path, "python3.12", "3.12")  # would be chosen without the override
    chosen = fake_python(tmp_path, "mine", version, venv)
    got_code, out, err = find_python(tmp_path, python=chosen)
    assert got_code == code
    if code == 0:
        assert out == chosen
    else:
        assert message in err and len(err.splitlines()) == 1

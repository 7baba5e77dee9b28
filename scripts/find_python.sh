#!/usr/bin/env bash
# Prints the path of a Python that can install this project's stack: $PYTHON if set,
# else the first of python3.12, python3.11, python3.10, python3 that runs, is one of
# those versions and has venv with pip (ensurepip). Each candidate is run, not just
# looked up: a pyenv shim answers `command -v` for a version that is not active.
# Where none qualifies it prints one line saying why and what to install, and exits 1.
# Used by quickstart.sh and .ci/run; tests/test_scripts.py runs it with fake interpreters.
set -u

SUPPORTED="3.12 3.11 3.10"

# "X.Y" of a candidate that runs, or nothing.
version_of() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

has_venv() {
  "$1" -c 'import ensurepip, venv' >/dev/null 2>&1
}

fail() {
  echo "error: $1" >&2
  exit 1
}

if [ -n "${PYTHON:-}" ]; then
  version=$(version_of "$PYTHON")
  [ -n "$version" ] || fail "PYTHON=$PYTHON does not run"
  case " $SUPPORTED " in
    *" $version "*) ;;
    *) fail "PYTHON=$PYTHON is Python $version; reste-larq needs Python 3.10, 3.11 or 3.12" ;;
  esac
  has_venv "$PYTHON" || fail "PYTHON=$PYTHON (Python $version) has no venv/ensurepip: on Debian/Ubuntu, apt-get install python$version-venv"
  command -v "$PYTHON" 2>/dev/null || echo "$PYTHON"
  exit 0
fi

found=""     # versions that ran but are not supported
no_venv=""   # supported versions without venv/ensurepip
for candidate in python3.12 python3.11 python3.10 python3; do
  version=$(version_of "$candidate")
  [ -n "$version" ] || continue
  case " $SUPPORTED " in
    *" $version "*) ;;
    *) found="$found $candidate=$version"; continue ;;
  esac
  if has_venv "$candidate"; then
    command -v "$candidate"
    exit 0
  fi
  no_venv="$no_venv $version"
done

if [ -n "$no_venv" ]; then
  v=${no_venv# }
  v=${v%% *}
  fail "Python $v has no venv/ensurepip: on Debian/Ubuntu, sudo apt-get install python$v-venv (or set PYTHON=/path/to/python3.12)"
fi
fail "reste-larq needs Python 3.10, 3.11 or 3.12 (found:${found:- none}; 3.13 has no larq-compute-engine wheel): install one, e.g. sudo apt-get install python3.12 python3.12-venv (Ubuntu 24.04) or python3.11 python3.11-venv (Debian 12), or pyenv install 3.12, then run again (or set PYTHON=/path/to/python3.12)"

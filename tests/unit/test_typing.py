"""The public surface is typed: mypy sees create()'s parameters and its return type per ``stream``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

TYPING = Path(__file__).resolve().parents[1] / "typing"
GOOD, BAD = TYPING / "create_types.py", TYPING / "create_type_errors.py"


@pytest.fixture(scope="module")
def mypy_output() -> str:
    """One mypy run over both files (a run costs tens of seconds)."""
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--follow-imports=silent",
         "--python-version=3.11", str(GOOD), str(BAD)],
        capture_output=True, text=True, cwd=TYPING.parents[1], timeout=600,
    )
    return done.stdout + done.stderr


def _error_lines(output: str, path: Path) -> set[int]:
    return {int(m.group(1)) for m in re.finditer(rf"{re.escape(path.name)}:(\d+): error", output)}


@pytest.mark.slow
def test_create_returns_a_response_a_stream_or_their_union_by_the_stream_argument(mypy_output: str) -> None:
    assert _error_lines(mypy_output, GOOD) == set(), mypy_output


@pytest.mark.slow
def test_misspelled_mistyped_and_unsupported_arguments_are_type_errors(mypy_output: str) -> None:
    expected = {i for i, line in enumerate(BAD.read_text().splitlines(), 1) if "# E:" in line}
    assert _error_lines(mypy_output, BAD) == expected, mypy_output

"""Run pytest and turn its "no tests collected" exit (5) into a failure, for make and CI."""

import sys

import pytest

code = pytest.main(sys.argv[1:])
if code == pytest.ExitCode.NO_TESTS_COLLECTED:
    print("run_pytest: no tests were collected: failing", file=sys.stderr)
    code = 1
sys.exit(int(code))

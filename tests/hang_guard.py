"""A hung test fails the run within minutes, with every thread's stack: never CI's time limit.

Two layers, because a hang can take the GIL with it:

- pytest-timeout (``timeout`` in pyproject.toml, signal method) fails a test that runs too long
  while Python still runs: the test fails with the stacks, the suite goes on.
- This plugin arms faulthandler's watchdog around every test, a C thread that needs no GIL. A
  deadlock in which a thread holds the GIL (two task threads on one autograd leaf: see
  docs/RELIABILITY.md) stops every Python thread, pytest-timeout's included, but not this one:
  it prints every thread's stack to the real stderr and ends the process with exit status 1.

Loaded with ``-p tests.hang_guard`` (pyproject.toml's addopts), before pytest captures output,
so the stderr it keeps is the terminal's or CI's log, not a capture file lost with the process.
``METARUN_TEST_HARD_TIMEOUT`` (seconds) overrides the limit.
"""

from __future__ import annotations

import faulthandler
import os
import sys

import pytest

#: Past pytest-timeout's limit, so a hang that leaves Python running fails only its test.
DEFAULT_HARD_TIMEOUT = 360.0

# A copy of the real stderr, taken when pytest imports this plugin (before capture starts).
_stderr = os.fdopen(os.dup(sys.stderr.fileno()), "w")


def hard_timeout() -> float:
    return float(os.environ.get("METARUN_TEST_HARD_TIMEOUT", DEFAULT_HARD_TIMEOUT))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # The stack the watchdog prints names the test's file and line; nothing else is needed.
    faulthandler.dump_traceback_later(hard_timeout(), exit=True, file=_stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()

"""A test that hangs with the GIL held still ends the run within seconds, with every stack."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_a_hang_holding_the_gil_ends_the_run_with_every_threads_stack(tmp_path: Path) -> None:
    # A thread sleeps inside a C call that keeps the GIL (ctypes.PyDLL does not release it), as
    # a thread stuck in a Python autograd.Function does: no Python-level watchdog can run.
    (tmp_path / "test_stuck.py").write_text(textwrap.dedent("""
        import ctypes, threading, time

        def hold_the_gil():
            ctypes.PyDLL(None).sleep(600)

        def test_stuck():
            threading.Thread(target=hold_the_gil, name="holder", daemon=True).start()
            time.sleep(1)
            raise AssertionError("unreachable: the holder keeps the GIL")
    """))
    # The project's own pytest settings (faulthandler_exit_on_timeout), with a shorter limit.
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(REPO_ROOT / "pyproject.toml"),
         "--rootdir", str(tmp_path), "-p", "no:cacheprovider", "-o", "faulthandler_timeout=5",
         str(tmp_path / "test_stuck.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert elapsed < 60
    assert "Timeout (0:00:05)!" in result.stderr
    assert "in hold_the_gil" in result.stderr  # the holder's stack
    assert "in test_stuck" in result.stderr  # and the main thread's
    assert result.stderr.count("Thread 0x") >= 2

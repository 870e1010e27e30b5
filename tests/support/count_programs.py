"""A pytest plugin that counts the steps whose banks were read at once (program.Programs.after)
and prints the count when the session ends: tests/runtime/test_program.py runs the tracker's
exactness tests in a subprocess with it."""

from symmech.runtime import program

STEPS = [0]
_after = program.Programs.after


def _counted(self, step, banks):
    STEPS[0] += 1
    return _after(self, step, banks)


program.Programs.after = _counted


def pytest_sessionfinish(session, exitstatus):
    print(f"\nsteps of banks read at once: {STEPS[0]}")

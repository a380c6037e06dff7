"""Benchmarks share the tests' input factories and oracles.

Run with timing:      make bench     (writes out/bench.json and prints the ratio tables)
Smoke-run, untimed:   pytest benchmarks --benchmark-disable   (each case once, small shapes)
"""


def pytest_generate_tests(metafunc):
    """A benchmark taking ``case`` runs over its module's CASES when timed, and over the small
    QUICK_CASES when only smoke-run (--benchmark-disable), so CI exercises every provider."""
    if "case" in metafunc.fixturenames:
        quick = bool(metafunc.config.getoption("benchmark_disable", default=False))
        cases = metafunc.module.QUICK_CASES if quick else metafunc.module.CASES
        metafunc.parametrize("case", cases, ids=[str(c).replace(" ", "") for c in cases])

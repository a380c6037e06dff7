"""Benchmarks share the tests' input factories and oracles.

Run with timing:      make bench     (writes out/bench.json and prints the ratio tables)
Smoke-run, untimed:   pytest benchmarks --benchmark-disable   (each case once, small shapes)
"""


def pytest_generate_tests(metafunc):
    """A benchmark taking ``case`` (``domain_case``) runs over its module's CASES
    (DOMAIN_CASES) when timed, and over the small QUICK_CASES (DOMAIN_QUICK_CASES) when only
    smoke-run (--benchmark-disable), so CI exercises every provider."""
    quick = bool(metafunc.config.getoption("benchmark_disable", default=False))
    for name, full, small in (("case", "CASES", "QUICK_CASES"), ("domain_case", "DOMAIN_CASES", "DOMAIN_QUICK_CASES")):
        if name in metafunc.fixturenames:
            cases = getattr(metafunc.module, small if quick else full)
            metafunc.parametrize(name, cases, ids=[str(c).replace(" ", "").replace("'", "") for c in cases])

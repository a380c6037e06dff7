"""nanotron: the 0.4 wheel on PyPI is imported to show whether it can read a config at all."""

from importlib.metadata import version

from common import report

try:
    from nanotron.config import NanosetDatasetsArgs  # noqa: F401

    report("nanotron", version("nanotron"), "nanotron", False,
           "imports: add a NanosetDatasetsArgs check before trusting this row")
except Exception as exc:  # noqa: BLE001
    report("nanotron", version("nanotron"), "nanotron", False,
           f"the wheel fails on import ({type(exc).__name__}: {str(exc)[:120]}); use nanotron's source tree")

import json

import pytest

from .factories import GOLDEN_PATH


@pytest.fixture(scope="session")
def golden():
    """The reference implementation's golden vectors (python_tests/data/krls_reference.json).
    A missing file is an error, not a skip: the weight maths would go unchecked."""
    with open(GOLDEN_PATH, encoding="utf-8") as f:
        return json.load(f)["cases"]

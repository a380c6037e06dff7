import json
import os

import pytest

from .factories import GOLDEN_PATH


@pytest.fixture(scope="session")
def golden():
    """The reference implementation's golden vectors (../shared/golden)."""
    if not os.path.exists(GOLDEN_PATH):
        pytest.skip(f"golden vectors not found at {GOLDEN_PATH} (set CHAMELEON_GOLDEN)")
    with open(GOLDEN_PATH) as f:
        return json.load(f)["cases"]

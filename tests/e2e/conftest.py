"""Fixtures of the end-to-end tests: a real anvil devnet per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedledger.devnet.anvil import AnvilProcess, start_anvil

ANVIL_ACCOUNTS = 8
"""Funded accounts: 0 admin, 1 coordinator, 2.. organisations (enough for every test here)."""


@pytest.fixture
def anvil() -> Iterator[AnvilProcess]:
    """anvil on a free loopback port, stopped after the test."""
    process = start_anvil(accounts=ANVIL_ACCOUNTS)
    yield process
    process.stop()

"""One fake OpenAI server for the bench tests; each test resets its settings and log first."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.bench.fake_server import FakeServer


@pytest.fixture(scope="session")
def _fake_server() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.stop()


@pytest.fixture
def fake(_fake_server: FakeServer) -> FakeServer:
    _fake_server.state.reset()
    return _fake_server

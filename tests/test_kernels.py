"""The fused C kernels (forkrl/cpu/kernels.c) against the torch operations they replace, on odd sizes (loop
tails), strided rows and extreme inputs; and how the library is found, built, refused and switched off."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from forkrl.cpu import kernels
from forkrl.cpu.engine import FastEngine


@pytest.fixture
def lib():
    lib = kernels.get()
    if lib is None:
        pytest.skip(f"fused kernels unavailable: {kernels.why}")
    return lib


def g(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("B,D", [(1, 7), (5, 48), (64, 256), (3, 1000)])
def test_rms_norm_with_and_without_a_record(lib, B, D):
    base = torch.randn(B, D + 5, generator=g()) * 3
    x = base[:, 2 : 2 + D]  # rows with a stride, as the final norm's x[:, -1]
    w = torch.randn(D, generator=g(1))
    r_ref = torch.mean(x.pow(2), -1, keepdim=True).add_(1e-6).rsqrt_()
    rec = torch.full((B, D + 3), float("nan"))  # a record slot with a row stride; its tail must stay untouched
    r = torch.full((B, 1), float("nan"))
    h = kernels.rms_norm(lib, x, w, 1e-6, torch.empty(B, D), rec[:, :D], r)
    torch.testing.assert_close(r, r_ref, rtol=2e-6, atol=0)
    torch.testing.assert_close(rec[:, :D], x * r_ref, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(h, x * r_ref * w, rtol=2e-6, atol=1e-6)
    assert rec[:, D:].isnan().all()
    torch.testing.assert_close(kernels.rms_norm(lib, x, w, 1e-6, torch.empty(B, D)), h, rtol=0, atol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_rope_cache_rotates_as_the_engine_and_fills_the_caches(lib, bias):
    B, H, K, d, cap, t = 3, 6, 2, 16, 9, 4
    eng = FastEngine.__new__(FastEngine)  # only its rotary tables
    eng.cfg, eng.head_dim = type("C", (), {"rope_theta": 10000.0})(), d
    cos, sin = eng._rope(cap, "cpu")
    sin = eng._signed_sin(sin)
    qkv = torch.randn(B, (H + 2 * K) * d, generator=g())
    b = torch.randn((H + 2 * K) * d, generator=g(2)) if bias else None
    pos = torch.tensor([4, 1, 7])
    ref = qkv + b if bias else qkv.clone()
    qk = ref[:, : (H + K) * d].view(B, H + K, d)
    qk.copy_(qk * cos[pos][:, None] + qk.roll(d // 2, dims=-1) * sin[pos][:, None])  # the engine's torch path
    kc, vc = torch.zeros(B, K, cap, d), torch.zeros(B, K, cap, d)
    kernels.rope_cache(lib, qkv, b, cos, sin, pos, kc, vc, H, t)
    torch.testing.assert_close(qkv, ref, rtol=0, atol=0)  # the same products and sums, unfused: bit for bit
    torch.testing.assert_close(kc[:, :, t], ref[:, H * d : (H + K) * d].view(B, K, d), rtol=0, atol=0)
    torch.testing.assert_close(vc[:, :, t], ref[:, (H + K) * d :].view(B, K, d), rtol=0, atol=0)
    assert not kc[:, :, :t].any() and not vc[:, :, t + 1 :].any()


@pytest.mark.parametrize("M,I", [(1, 5), (7, 33), (300, 768)])
def test_swiglu_and_its_backward(lib, M, I):
    gu = torch.randn(M, 2 * I + 3, generator=g())[:, : 2 * I] * 6  # strided rows, both tails of exp's range
    gu[0, :4] = torch.tensor([-120.0, 95.0, 0.0, -0.0])[: min(4, I)]
    gate, up = gu[:, :I], gu[:, I:]
    a = kernels.swiglu(lib, gu, torch.empty(M, I))
    torch.testing.assert_close(a, F.silu(gate) * up, rtol=2e-6, atol=1e-6)
    da = torch.randn(M, I, generator=g(1))
    dgu = kernels.swiglu_backward(lib, da, gu, torch.empty(M, 2 * I))
    torch.testing.assert_close(dgu[:, :I], torch.ops.aten.silu_backward(da * up, gate), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(dgu[:, I:], da * F.silu(gate), rtol=2e-6, atol=1e-6)
    assert dgu.isfinite().all()


def test_swiglu_reads_rows_through_an_index(lib):
    N, M, I = 40, 25, 19
    gu = torch.randn(N, 2 * I, generator=g()) * 3
    idx = torch.randperm(N, generator=g(1))[:M]
    a = kernels.swiglu(lib, gu, torch.empty(M, I), idx)
    torch.testing.assert_close(a, kernels.swiglu(lib, gu[idx].contiguous(), torch.empty(M, I)), rtol=0, atol=0)
    da = torch.randn(M, I, generator=g(2))
    dgu = kernels.swiglu_backward(lib, da, gu, torch.empty(M, 2 * I), idx)
    ref = kernels.swiglu_backward(lib, da, gu[idx].contiguous(), torch.empty(M, 2 * I))
    torch.testing.assert_close(dgu, ref, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="out of range"):
        kernels.swiglu(lib, gu, torch.empty(2, I), torch.tensor([0, N]))


@pytest.mark.parametrize("K,G,d", [(2, 2, 64), (1, 6, 16), (3, 1, 8)])
def test_attend_step_equals_masked_attention(lib, K, G, d):
    B, cap = 5, 12
    H = K * G
    start = torch.tensor([0, 3, 1, 5, 0])  # left padding per row
    kc, vc = torch.randn(B, K, cap, d, generator=g()), torch.randn(B, K, cap, d, generator=g(1))
    qkv = torch.randn(B, (H + 2 * K) * d + 3, generator=g(2))[:, : (H + 2 * K) * d]  # strided rows
    for length in (6, 1 + int(start.max()), cap):
        out = torch.full((B, H * d + 2), float("nan"))
        kernels.attend_step(lib, qkv, kc, vc, start, out[:, : H * d], H, length)
        q = qkv[:, : H * d].view(B, H, 1, d)
        keep = (torch.arange(length)[None] >= start[:, None])[:, None, None]  # [B, 1, 1, L]
        ref = F.scaled_dot_product_attention(q, kc[:, :, :length], vc[:, :, :length], attn_mask=keep,
                                             enable_gqa=K != H)
        torch.testing.assert_close(out[:, : H * d], ref.reshape(B, H * d), rtol=1e-5, atol=1e-5)
        assert out[:, H * d :].isnan().all()


@pytest.mark.parametrize("M,D", [(3, 7), (500, 256)])
def test_rms_backward(lib, M, D):
    dh, xhat = torch.randn(M, D, generator=g()), torch.randn(M, D, generator=g(1))
    r, w = torch.rand(M, 1, generator=g(2)) + 0.5, torch.randn(D, generator=g(3))
    dx0 = torch.randn(M, D, generator=g(4))
    dx, dw = dx0.clone(), torch.ones(D)  # both accumulate
    kernels.rms_backward(lib, dh, xhat, r, w, dx, dw)
    gh = dh * w
    torch.testing.assert_close(dx, dx0 + (gh - xhat * (gh * xhat).mean(-1, keepdim=True)) * r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, 1 + (dh * xhat).sum(0), rtol=1e-5, atol=1e-4)
    dx2 = dx0.clone()
    kernels.rms_backward(lib, dh, xhat, r, w, dx2, None)  # dx alone
    torch.testing.assert_close(dx2, dx, rtol=0, atol=0)


@pytest.mark.parametrize("B,shapes", [(64, [(768, 256), (256, 256)]), (3, [(17, 5), (1, 33), (130, 64)])])
def test_packed_weights_multiply_as_torch(lib, B, shapes):
    """Weights packed together (pack_weights, each 64-byte aligned in one buffer) multiply as x · wᵀ does."""
    if not kernels.packed:
        pytest.skip("MKL's packed products are not exported by this torch's libtorch_cpu")
    ws = [torch.randn(o, i, generator=g(o)) for o, i in shapes]
    buf, addresses = kernels.pack_weights(lib, ws, B)
    assert all(a % 64 == 0 for a in addresses) and len(set(addresses)) == len(ws)
    for w, a in zip(ws, addresses):
        x = torch.randn(B, w.shape[1] + 3, generator=g(1))[:, 3:]  # rows with a stride
        out = kernels.packed_linear(lib, x, a, torch.empty(B, w.shape[0]))
        torch.testing.assert_close(out, x @ w.t(), rtol=1e-5, atol=1e-5)


def test_a_kernel_refuses_a_tensor_it_cannot_read(lib):
    with pytest.raises(ValueError, match="contiguous rows"):
        kernels.rms_norm(lib, torch.randn(8, 4).t(), torch.ones(8), 1e-6, torch.empty(4, 8))
    with pytest.raises(ValueError, match="float32"):
        kernels.rms_norm(lib, torch.randn(4, 8, dtype=torch.float64), torch.ones(8), 1e-6, torch.empty(4, 8))


def fresh(env: dict) -> str:
    """What a new process's kernels.get() says (``ok`` or the reason for None), under ``env``."""
    code = ("from forkrl.cpu import kernels; lib = kernels.get(); "
            "print('ok' if lib is not None else 'none: ' + kernels.why)")
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_switched_off_by_the_environment_and_a_failed_build_says_why(tmp_path, lib):
    assert fresh({"FORKRL_KERNELS": "0"}) == "none: FORKRL_KERNELS=0"
    out = fresh({"CC": "false", "FORKRL_CACHE": str(tmp_path)})  # a compiler that fails: a reason, not a crash
    assert out.startswith("none: false failed on") and "kernels.c" in out  # and a warning on stderr
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.so.*"))
    assert fresh({"FORKRL_CACHE": str(tmp_path)}) == "ok"  # built into this cache, then loaded from it
    assert len(list((tmp_path / "kernels").glob("*.so"))) == 1
    assert fresh({"FORKRL_CACHE": str(tmp_path)}) == "ok"

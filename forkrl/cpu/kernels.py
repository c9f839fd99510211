"""Fused float32 CPU kernels (``kernels.c``) for the fast decoder and the replayed update, called through ctypes.

``get()`` compiles ``kernels.c`` with the system C compiler once per machine (the shared library is cached under
``models.cache_dir()/kernels``, keyed by the source, the compiler and the CPU) and returns the loaded library, or
None where it cannot: no compiler or a failed build (a warning, once, and the reason, the compiler's message
included, in ``why``), or ``FORKRL_KERNELS=0`` in the environment. Callers then run the equivalent torch
operations, which give the same results to float rounding (``tests/test_kernels.py`` checks both against each
other). The library links the OpenMP runtime torch already loaded (libgomp), so its parallel loops share torch's
threads. ``blas``: whether the library also found the Fortran ``sgemm_`` of torch's BLAS, which
``decode_layers`` (a whole decode step in one call) multiplies with; ``packed``: whether it found MKL's packed
products too (``pack_weights``), which it multiplies with where the engine packed the weights.

Every wrapper here takes float32 CPU tensors whose rows are contiguous and checks it: a kernel reads raw memory.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
# -ffp-contract=off: no fused multiply-adds where the torch code rounds a product and a sum separately;
# -fno-trapping-math lets the compiler turn exp's clamps into selects, so its loops vectorise
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC",
         "-shared"]
FLAGS += ["-mprefer-vector-width=512"] if platform.machine() in ("x86_64", "AMD64") else []

_lib: ctypes.CDLL | None = None
_tried = False
why: str | None = None  # why get() returned None
enabled = True  # False: get() returns None, and callers run the torch operations (tests compare the two)
blas = False  # whether decode_layers can run: the library found torch's BLAS (its Fortran sgemm)
packed = False  # whether it also found MKL's packed products (pack_weights), for decode_layers to multiply with


def _cpu_key() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(next((ln for ln in lines if ln.startswith(k)), "") for k in ("model name", "flags"))
    except OSError:
        return platform.processor() or platform.machine()


def _build(out: Path, cc: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)  # built aside, renamed in: concurrent builds are safe
    os.close(fd)
    try:
        run = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=False, capture_output=True,
                             text=True, timeout=120)
        if run.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE}: {run.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    sig = {"rms_norm": [p, i64, p, f32, p, i64, p, i64, p, i64, i64],
           "rope_cache": [p, i64, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64],
           "swiglu": [p, i64, p, p, i64, i64],
           "swiglu_backward": [p, p, i64, p, p, i64, i64],
           "rms_backward": [p, p, p, p, p, p, i64, i64],
           "rope_back_pack": [p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64],
           "attend_step": [p, i64, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, f32],
           "set_sgemm": [p],
           "set_packed_gemm": [p, p, p],
           "packed_bytes": [i64, i64, i64],
           "pack_weight": [p, i64, i64, i64, p],
           "packed_linear": [p, i64, p, i64, i64, p, i64, f32, i64],
           "decode_layers": [i64, p, p, p, p, p, p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, i64, f32]}
    for name, args in sig.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    lib.decode_layers.restype = lib.pack_weight.restype = lib.packed_linear.restype = ctypes.c_int
    lib.packed_bytes.restype = ctypes.c_int64


def _unavailable(reason: str) -> None:
    global why
    why = reason
    warnings.warn(f"forkrl: the fused CPU kernels are unavailable ({reason}); the torch operations run instead "
                  "(slower, the same results to float rounding). FORKRL_KERNELS=0 turns them off without this warning.",
                  RuntimeWarning, stacklevel=3)


def get() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None (reason in ``why``) where it cannot be."""
    global _lib, _tried, why, blas, packed
    if not enabled:
        return None
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("FORKRL_KERNELS", "1") == "0":
        why = "FORKRL_KERNELS=0"
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return _unavailable("no C compiler (cc or gcc) on PATH")
    from ..models import cache_dir

    try:
        version = subprocess.run([cc, "--version"], check=False, capture_output=True, text=True).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), _cpu_key()]).encode())
        path = cache_dir() / "kernels" / f"forkrl_kernels_{key.hexdigest()[:16]}.so"
        if not path.exists():
            _build(path, cc)
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return _unavailable(str(e))
    blas, packed = _find_blas(lib)
    _lib = lib
    return lib


def _find_blas(lib) -> tuple[bool, bool]:
    """Give the library the Fortran ``sgemm_`` of the BLAS torch links (MKL in the x86 CPU wheels, exported by
    libtorch_cpu; its 32-bit-integer interface), so a whole decode step runs in C with torch's own products, and
    MKL's packed products where they are there too. Returns (sgemm_ found, the packed products found).
    ``tests/test_engine.py`` checks the step against the layer-by-layer one, with and without packing."""
    try:
        torch_cpu = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        address = ctypes.cast(torch_cpu.sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return False, False
    lib.set_sgemm(address)
    try:
        names = ("cblas_sgemm_pack_get_size", "cblas_sgemm_pack", "cblas_sgemm_compute")
        lib.set_packed_gemm(*(ctypes.cast(getattr(torch_cpu, n), ctypes.c_void_p).value for n in names))
    except AttributeError:
        return True, False
    return True, True


def pack_weights(lib, weights: list[torch.Tensor], rows: int) -> tuple[torch.Tensor, list[int]]:
    """Each of ``weights`` ([out, in], contiguous float32) in MKL's packed layout for ``decode_layers``' product with
    ``rows`` rows, all in one buffer (one allocation, returned to the system as a whole when freed). Returns (the
    buffer, each packed weight's address): MKL's packed data must stay where it is, so the buffer has to outlive the
    steps reading it. Packing once per sampling call saves the repacking every sgemm call does at every step."""
    sizes = []
    for w in weights:
        assert w.is_contiguous() and w.dtype == torch.float32 and w.device.type == "cpu" and w.dim() == 2
        size = lib.packed_bytes(*w.shape, rows)
        if size < 0:
            raise RuntimeError("pack_weights: MKL's packed products were not found (kernels.packed is False)")
        sizes.append(-(-size // 64) * 64)  # each one 64-byte aligned
    flat = torch.empty(sum(sizes) // 4 + 16)
    at = -(-flat.data_ptr() // 64) * 64
    addresses = []
    for w, size in zip(weights, sizes):
        lib.pack_weight(w.data_ptr(), *w.shape, rows, at)
        addresses.append(at)
        at += size
    return flat, addresses


def packed_linear(lib, x_BI: torch.Tensor, packed: int, out_BO: torch.Tensor) -> torch.Tensor:
    """out = x · wᵀ through ``packed``, the address ``pack_weights`` gave w [O, I] for these B rows; into ``out_BO``
    (contiguous). The decoder's product, one at a time from Python (the benchmark times them alone)."""
    (B, inner), out = x_BI.shape, out_BO.shape[1]
    assert out_BO.is_contiguous() and out_BO.shape[0] == B and out_BO.dtype == torch.float32
    if lib.packed_linear(x_BI.data_ptr(), _row_stride(x_BI, "x"), packed, out, inner, out_BO.data_ptr(), out, 0.0,
                         B) != 0:
        raise RuntimeError("packed_linear: MKL's packed products were not found (kernels.packed is False)")
    return out_BO


def _row_stride(t: torch.Tensor, name: str) -> int:
    """The row stride of a float32 CPU matrix whose rows are contiguous."""
    if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(f"{name}: a float32 CPU matrix with contiguous rows is needed, got {t.dtype} {t.device} "
                         f"shape {tuple(t.shape)} strides {t.stride()}")
    return t.stride(0)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def rms_norm(lib, x_BD, w_D, eps: float, h_BD, xhat_BD=None, r_B1=None) -> torch.Tensor:
    """h = w·x̂, x̂ = x·r, r = (mean(x²) + eps)^−½, into ``h_BD`` (contiguous); x̂ and r also into ``xhat_BD`` and
    ``r_B1`` where given. Returns h."""
    B, D = x_BD.shape
    assert h_BD.is_contiguous() and h_BD.shape == (B, D) and w_D.is_contiguous() and w_D.numel() == D
    sxh = _row_stride(xhat_BD, "xhat") if xhat_BD is not None else 0
    sr = _row_stride(r_B1, "r") if r_B1 is not None else 0
    lib.rms_norm(x_BD.data_ptr(), _row_stride(x_BD, "x"), w_D.data_ptr(), eps, _ptr(xhat_BD), sxh, _ptr(r_B1), sr,
                 h_BD.data_ptr(), B, D)
    return h_BD


def rope_cache(lib, qkv_BF, bias_F, cos_PD, sin_PD, pos_B, k_BKCd, v_BKCd, n_heads: int, t: int) -> None:
    """Add the bias (or None) to one decode step's q|k|v rows, rotate their queries and keys in place, and write keys
    and values into the caches [B, K, cap, d] at position ``t`` (kernels.c ``rope_cache``)."""
    B, K, cap, d = k_BKCd.shape
    assert k_BKCd.is_contiguous() and v_BKCd.is_contiguous() and v_BKCd.shape == k_BKCd.shape
    assert cos_PD.is_contiguous() and sin_PD.is_contiguous() and cos_PD.shape[1] == d
    assert pos_B.dtype == torch.int64 and pos_B.is_contiguous() and qkv_BF.shape == (B, (n_heads + 2 * K) * d)
    assert bias_F is None or (bias_F.is_contiguous() and bias_F.shape == qkv_BF.shape[1:])
    lib.rope_cache(qkv_BF.data_ptr(), _row_stride(qkv_BF, "qkv"), _ptr(bias_F), cos_PD.data_ptr(), sin_PD.data_ptr(),
                   pos_B.data_ptr(), k_BKCd.data_ptr(), v_BKCd.data_ptr(), B, n_heads, K, d, cap, t)


def _row_indices(idx_M, rows: int, M: int):
    """The row indices a kernel reads through (or None: rows 0 … M − 1), checked against the ``rows`` it may read."""
    if idx_M is None:
        assert M <= rows
        return None
    assert idx_M.dtype == torch.int64 and idx_M.is_contiguous() and idx_M.numel() == M
    assert M == 0 or (int(idx_M.min()) >= 0 and int(idx_M.max()) < rows), "row index out of range"
    return idx_M.data_ptr()


def swiglu(lib, gu_NF, a_MI, idx_M=None) -> torch.Tensor:
    """a = silu(g)·u for rows [g | u] of ``gu_NF`` (row ``idx_M[m]`` where given), into ``a_MI`` (contiguous)."""
    M, I = a_MI.shape
    assert a_MI.is_contiguous() and gu_NF.shape[1] == 2 * I
    idx = _row_indices(idx_M, gu_NF.shape[0], M)
    lib.swiglu(gu_NF.data_ptr(), _row_stride(gu_NF, "gu"), idx, a_MI.data_ptr(), M, I)
    return a_MI


def swiglu_backward(lib, da_MI, gu_NF, dgu_MF, idx_M=None) -> torch.Tensor:
    """[dg | du] of a = silu(g)·u given da, into ``dgu_MF`` (contiguous); [g | u] read as ``swiglu`` reads it."""
    M, I = da_MI.shape
    assert da_MI.is_contiguous() and dgu_MF.is_contiguous() and gu_NF.shape[1] == 2 * I and dgu_MF.shape == (M, 2 * I)
    idx = _row_indices(idx_M, gu_NF.shape[0], M)
    lib.swiglu_backward(da_MI.data_ptr(), gu_NF.data_ptr(), _row_stride(gu_NF, "gu"), idx, dgu_MF.data_ptr(), M, I)
    return dgu_MF


def rms_backward(lib, dh_MD, xhat_MD, r_M1, w_D, dx_MD=None, dw_D=None) -> None:
    """RMSNorm's backward: dx += r·(ĝ − x̂·mean(ĝ·x̂)), ĝ = w·dh, and dw += Σ dh·x̂, each where given."""
    M, D = dh_MD.shape
    for t in (dh_MD, xhat_MD, r_M1, w_D) + tuple(t for t in (dx_MD, dw_D) if t is not None):
        assert t.is_contiguous() and t.dtype == torch.float32, "rms_backward needs contiguous float32 tensors"
    assert xhat_MD.shape == (M, D) and r_M1.numel() == M and w_D.numel() == D
    lib.rms_backward(dh_MD.data_ptr(), xhat_MD.data_ptr(), r_M1.data_ptr(), w_D.data_ptr(), _ptr(dx_MD),
                     _ptr(dw_D), M, D)


def rope_back_pack(lib, dq_RKGLd, dk_RKLd, dv_RKLd, cos_Md, sin_Md, own_M, src_M, dqkv_PF) -> torch.Tensor:
    """The attention's gradients through the rotary embedding's transpose, into the packed q|k|v rows
    ``dqkv_PF`` (every row written; kernels.c ``rope_back_pack``). Returns it."""
    R, K, G, L, d = dq_RKGLd.shape
    P = dqkv_PF.shape[0]
    for t in (dq_RKGLd, dk_RKLd, dv_RKLd, cos_Md, sin_Md, dqkv_PF):
        assert t.is_contiguous() and t.dtype == torch.float32, "rope_back_pack needs contiguous float32 tensors"
    assert dk_RKLd.shape == dv_RKLd.shape == (R, K, L, d) and cos_Md.shape == sin_Md.shape == (L * R, d)
    assert own_M.dtype == src_M.dtype == torch.int64 and own_M.is_contiguous() and src_M.is_contiguous()
    assert own_M.numel() == src_M.numel() == L * R and dqkv_PF.shape[1] == (K * G + 2 * K) * d
    lib.rope_back_pack(dq_RKGLd.data_ptr(), dk_RKLd.data_ptr(), dv_RKLd.data_ptr(), cos_Md.data_ptr(),
                       sin_Md.data_ptr(), own_M.data_ptr(), src_M.data_ptr(), dqkv_PF.data_ptr(), P, R, K, G, L, d)
    return dqkv_PF


def attend_step(lib, qkv_BF, k_BKCd, v_BKCd, start_B, out_BF, n_heads: int, length: int) -> torch.Tensor:
    """One decode step's attention over the first ``length`` cache positions, rows b from ``start_B[b]`` (the
    left padding before it masked), queries from the first ``n_heads`` heads of the q|k|v rows; into ``out_BF``."""
    B, K, cap, d = k_BKCd.shape
    assert k_BKCd.is_contiguous() and v_BKCd.is_contiguous() and start_B.dtype == torch.int64
    assert start_B.is_contiguous() and out_BF.shape == (B, n_heads * d) and 0 < length <= cap
    lib.attend_step(qkv_BF.data_ptr(), _row_stride(qkv_BF, "qkv"), k_BKCd.data_ptr(), v_BKCd.data_ptr(),
                    start_B.data_ptr(), out_BF.data_ptr(), _row_stride(out_BF, "out"), B, K, n_heads // K, d, cap,
                    length, d**-0.5)
    return out_BF


def decode_layers(lib, weights, packs, records, x_BD, bufs, cos_PD, sin_PD, pos_B, start_B, *, n_heads: int,
                  n_kv: int, head_dim: int, intermediate: int, cap: int, at: int, eps: float) -> None:
    """One decode step through every layer in C (kernels.c ``decode_layers``), the residual stream ``x_BD`` updated
    in place. ``weights``/``packs``/``records``: ctypes arrays of the per-layer pointers ``engine.FastEngine``
    prepares (9 per layer; 4 per layer from ``pack_weights`` for these ``B`` rows, or None; 7 record bases per
    layer, or None); ``bufs``: scratch (h, q|k|v, attention, gate|up, SwiGLU)."""
    B, D = x_BD.shape
    assert x_BD.is_contiguous() and pos_B.is_contiguous() and start_B.is_contiguous() and 0 <= at < cap
    assert packs is None or len(packs) == 4 * (len(weights) // 9)
    h, qkv, att, gu, a = bufs
    rc = lib.decode_layers(len(weights) // 9, weights, packs, records, x_BD.data_ptr(), h.data_ptr(), qkv.data_ptr(),
                           att.data_ptr(), gu.data_ptr(), a.data_ptr(), cos_PD.data_ptr(), sin_PD.data_ptr(),
                           pos_B.data_ptr(), start_B.data_ptr(), B, D, n_heads, n_kv, head_dim, intermediate, cap,
                           at, eps)
    if rc != 0:
        raise RuntimeError("decode_layers: no BLAS was set (kernels.blas is False), or packs were given without MKL's "
                           "packed products (kernels.packed is False)")

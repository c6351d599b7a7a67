"""Fused CPU kernels for decode (`parallel/csrc/cpu_ops.cpp`), compiled for this machine.

Between two weight streams a decode layer runs a dozen tiny ops (norms, RoPE, the cache store,
attention over a few hundred keys) whose dispatch costs more than their arithmetic; the
kernels do each stretch in one call. The library is built on first use with the system C++
compiler against the installed torch (`-march=native`), cached under
`$SHARDSERVE_CACHE_DIR` (default `~/.cache/shardserve`) by a key of the source, torch version
and CPU, and built once even when several ranks start together. Where it cannot be built, the
engine keeps the torch ops (`NativeBuildError` says why).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SOURCE = Path(__file__).parent / "csrc" / "cpu_ops.cpp"
# torch.ops registers a library's namespace once per process, so loading is once per process
# too; the lock keeps two engine threads from racing to it
_LOAD_LOCK = threading.Lock()


class NativeBuildError(RuntimeError):
    """The fused CPU kernels could not be compiled or loaded here."""


def cache_dir() -> Path:
    return Path(os.environ.get("SHARDSERVE_CACHE_DIR") or Path.home() / ".cache" / "shardserve")


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _compile_command(src: Path, out: Path) -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = str(Path(torch.__file__).parent / "lib")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # -ffp-contract=off: no implicit a * b + c -> fma, so element-wise results round exactly
    # like the torch ops they replace (the kernels' dot products use fma explicitly)
    return [os.environ.get("CXX", "c++"), "-O3", "-march=native", "-ffp-contract=off",
            "-fopenmp", "-std=c++17",
            "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *[f"-I{p}" for p in cpp_extension.include_paths()], str(src), "-o", str(out),
            f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]


def build_library(directory: Path | None = None) -> Path:
    """Path of the compiled library for this source, torch and CPU, compiling it if needed."""
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()
                         + _cpu_signature().encode()).hexdigest()[:16]
    directory = directory or cache_dir() / "ext"
    target = directory / f"cpu_ops-{key}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise NativeBuildError(f"no C++ compiler ({compiler!r}) on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    failed = directory / f"cpu_ops-{key}.failed"  # a failed compile is not retried per start
    with open(directory / f"cpu_ops-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ranks starting together: one compiles, the rest wait
        if target.exists():
            return target
        if failed.exists():
            raise NativeBuildError(f"an earlier build of {SOURCE.name} failed; its compiler "
                                   f"output is in {failed} (delete that file to retry)")
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            partial = Path(tmp) / target.name
            done = subprocess.run(_compile_command(SOURCE, partial), capture_output=True,
                                  text=True, timeout=600)
            if done.returncode != 0:
                failed.write_text(done.stderr)
                raise NativeBuildError(f"compiling {SOURCE.name} failed:\n{done.stderr[-2000:]}")
            os.replace(partial, target)
    return target


def load_cpu_ops() -> CpuOps:
    """The kernels, built if needed and loaded into this process once."""
    with _LOAD_LOCK:
        return _load()


@functools.cache
def _load() -> CpuOps:
    if platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        raise NativeBuildError(f"no fused kernels for {platform.machine()}")
    path = build_library()
    try:
        torch.ops.load_library(str(path))
    except OSError as e:
        raise NativeBuildError(f"loading {path}: {e}") from e
    return CpuOps()


@dataclass(frozen=True)
class CpuOps:
    """Typed entry points to the loaded kernels (see cpu_ops.cpp for the exact semantics)."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight * rms_norm(x + residual), x + residual); the sum is x without residual."""
        return torch.ops.shardserve.rms_norm(x, weight, eps, residual)

    def rope_store(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                   heads: int, kv_heads: int) -> torch.Tensor:
        """RoPE'd q (tokens, heads, d) from qkv (tokens, ...); RoPE'd k and v go to the cache."""
        return torch.ops.shardserve.rope_store(qkv, cos, sin, k_cache, v_cache, slots, heads,
                                               kv_heads)

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, positions: torch.Tensor,
                         kv_index: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
        """q (batch, heads, d) over each row's cached keys 0..position -> (batch, heads, d)."""
        return torch.ops.shardserve.decode_attention(q, k_cache, v_cache, block_tables,
                                                     positions, kv_index, scale, window or 0)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for gate_up = [gate | up] on the last dim."""
        return torch.ops.shardserve.silu_mul(gate_up)


def native_wanted(dtype: torch.dtype, device: torch.device) -> bool:
    """The kernels serve low-precision CPU models; fp32 (the parity reference) and GPUs keep
    the torch ops."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def attach_native(model: nn.Module, ops: CpuOps) -> int:
    """Give every module that can use the kernels (it declares a `native` attribute) the ops;
    returns how many took them."""
    count = 0
    for m in model.modules():
        if hasattr(type(m), "native"):
            m.native = ops
            count += 1
    return count

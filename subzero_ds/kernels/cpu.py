"""Builds (once, cached) and loads the C++ kernel of ``cpu_kernels.cpp``.

torch's extension builder compiles it with the host's g++ and ninja (both needed by DeepSpeed's
ops too) into ``~/.cache/torch_extensions`` (``TORCH_EXTENSIONS_DIR`` overrides); ranks starting
together wait on one build. ``scripts/setup.sh`` builds it ahead of time. Without a compiler the
op falls back to the torch reference, with one warning: correct, but about 100× slower. A build lock
left by a killed build is cleared (or reported) first: torch would wait on it forever (``build_locks.py``).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

logger = logging.getLogger("subzero_ds")

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# -ffp-contract=off: no fused multiply-add, so the fp32 arithmetic is the reference's, op for op
# (vector widths change nothing: every lane is the same IEEE operation).
# -fopenmp: at::parallel_for threads through OpenMP, and the libgomp torch already loaded is the one
# used (the same soname), so torch.set_num_threads sets our thread count too.
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c++17", "-fopenmp"]


def vector_isa() -> str:
    """The widest x86 vector extension the host CPU has: "avx512f", "avx2" or "" (then the compiler's default)."""
    try:
        flags = next((line.split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    except OSError:
        flags = []
    return next((isa for isa in ("avx512f", "avx2") if isa in flags), "")


@functools.cache
def compiled() -> ModuleType | None:
    """The compiled kernel module, or None (after one warning) if it cannot be built here.

    Built for the widest vector extension the CPU has (AVX-512, AVX2), under a name that says
    which: a cache directory shared by machines of different generations never hands a build to a
    CPU that cannot run it. The width changes no bit of the results.
    """
    from torch.utils.cpp_extension import load

    from .build_locks import clear_stale_build_locks

    clear_stale_build_locks()  # outside the try: a lock only the user can clear is reported, not built around
    isa = vector_isa()
    try:
        return load(name="subzero_ds_cpu_kernels" + (f"_{isa}" if isa else ""), sources=[str(SOURCE)],
                    extra_cflags=FLAGS + ([f"-m{isa}"] if isa else []), extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no ninja, read-only cache …: the reference still works
        logger.warning(f"subzero_ds: could not build the CPU kernel ({type(error).__name__}: {error}); "
                       "directions on the host use the torch reference, which is much slower. Install g++ "
                       "and ninja (pip install ninja), or set TORCH_EXTENSIONS_DIR to a writable directory.")
        return None

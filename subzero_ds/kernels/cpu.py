"""Builds (once, cached) and loads the C++ kernel of ``cpu_kernels.cpp``.

torch's extension builder compiles it with the host's g++ and ninja (both needed by DeepSpeed's
ops too) into ``~/.cache/torch_extensions`` (``TORCH_EXTENSIONS_DIR`` overrides); ranks starting
together wait on one build. ``scripts/setup.sh`` builds it ahead of time. Without a compiler the
op falls back to the torch reference, with one warning: correct, but about 100× slower.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

logger = logging.getLogger("subzero_ds")

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# -ffp-contract=off: no fused multiply-add, so the fp32 arithmetic is the reference's, op for op.
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c++17"]


@functools.cache
def compiled() -> ModuleType | None:
    """The compiled kernel module, or None (after one warning) if it cannot be built here."""
    from torch.utils.cpp_extension import load

    try:
        return load(name="subzero_ds_cpu_kernels", sources=[str(SOURCE)], extra_cflags=FLAGS, verbose=False)
    except Exception as error:  # no compiler, no ninja, read-only cache …: the reference still works
        logger.warning(f"subzero_ds: could not build the CPU kernel ({type(error).__name__}: {error}); "
                       "directions on the host use the torch reference, which is much slower. Install g++ "
                       "and ninja (pip install ninja), or set TORCH_EXTENSIONS_DIR to a writable directory.")
        return None

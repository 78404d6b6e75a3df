"""Registry of the project's Triton kernels, for `make cuda-check` (AOT compile for sm_90 without
a GPU). Each entry: (module path, kernel name, signature dict, constexprs dict). Kernels are
added here as ops gain Triton implementations; the CUDA C++ kernels are checked separately.
"""

from __future__ import annotations

TRITON_KERNELS: list[tuple[str, str, dict[str, str], dict[str, object]]] = []

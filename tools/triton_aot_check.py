"""AOT-compiles every Triton kernel registered in engine.triton_kernels for sm_90 (no GPU needed),
so a kernel that does not compile for Hopper fails CI, not the GPU run."""

from __future__ import annotations

import importlib
import sys


def main() -> int:
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover
        print(f"triton not installed ({exc}): nothing to compile")
        return 0
    from engine.triton_kernels import TRITON_KERNELS

    target = GPUTarget("cuda", 90, 32)
    failures = 0
    for module, name, signature, constexprs in TRITON_KERNELS:
        fn = getattr(importlib.import_module(module), name)
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)
            print(f"ok   sm_90  {module}.{name}  ({len(compiled.asm['cubin'])} bytes cubin)")
        except Exception as exc:
            failures += 1
            print(f"FAIL {module}.{name}: {exc}", file=sys.stderr)
    print(f"{len(TRITON_KERNELS)} Triton kernel(s) registered, {failures} failed (triton {triton.__version__})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

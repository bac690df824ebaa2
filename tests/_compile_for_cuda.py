"""Compile every Triton kernel of the package for a CUDA target, without a GPU.

Run as a script in a process where TRITON_INTERPRET is unset:
``python tests/_compile_for_cuda.py 90 80``. The real launchers run on CPU
tensors with kernel launches intercepted; each intercepted launch's argument
types, constexprs and num_warps are compiled ahead of time with
``triton.compile`` for each given compute capability (PTX and cubin, via the
ptxas bundled with Triton). Prints one line per compiled kernel variant and
exits non-zero if any fails.
"""
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
          torch.int32: "*i32", torch.int64: "*i64", torch.int8: "*i8", torch.bool: "*i1"}
captured = {}


def _capture(self, *args, grid, warmup, **kwargs):
    names = self.arg_names
    bound = dict(zip(names, args), **kwargs)
    signature, constexprs = {}, {}
    for p in self.params:
        value = bound[p.name]
        if p.is_constexpr:
            constexprs[p.name] = value
            signature[p.name] = "constexpr"
        elif torch.is_tensor(value):
            signature[p.name] = _TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i64" if abs(value) >= 2 ** 31 else "i32"
        else:
            signature[p.name] = "fp32"
    key = (self.fn.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())))
    captured[key] = (self, signature, constexprs, kwargs.get("num_warps", 4))


def main(capabilities):
    JITFunction.run = _capture
    from eos_kernels.triton import importance as I
    from eos_kernels.triton import reduce as R

    I.check_launchable = R.check_launchable = lambda device: None  # CPU tensors, launches captured

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for norm in ("token", "frobenius"):
            A = torch.randn(2, 20, 96, dtype=dtype)
            D = torch.randn(2, 40, 96, dtype=dtype)
            q = torch.randn(2, 40)
            params = [torch.tensor(v) for v in (0.3, 0.5, 0.1, 0.4, 0.6)]
            _, saved = R._forward(A, D, q, params, 10.0, norm, need_backward=True)
            R._backward(torch.randn_like(A), A, D, q, saved, 10.0, norm, (True,) * 8)
            R._forward(A, D, q, [0.3, 0.5, 0.1, 0.0, 0.0], 10.0, norm, need_backward=False)
        for dh in (128, 80):  # LLaVA-7B's head size and one that is not a power of two
            Q = torch.randn(1, 4, 40, dh, dtype=dtype)
            Kt = torch.randn(1, 2, 40, dh, dtype=dtype)
            rows = torch.arange(30, 40, dtype=torch.int32)[None]
            keep = torch.ones(1, 40, dtype=torch.int8)
            visual = torch.zeros(1, 40, dtype=torch.int8)
            visual[:, 5:30] = 1
            bounds = torch.tensor([[0, 5, 30]], dtype=torch.int32)
            I.text_to_visual_importance_sums(Q, Kt, rows, keep, visual, bounds, dh ** -0.5, block_m=32)
    failures = 0
    for (name, _, _), (fn, signature, constexprs, num_warps) in sorted(captured.items(), key=lambda x: x[0][0]):
        for cc in capabilities:
            try:
                src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
                triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps})
                status = "ok"
            except Exception as exc:  # report and go on: every failure is listed
                failures += 1
                status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"sm_{cc} {name} {sorted(constexprs.items())} {status}")
    print(f"{len(captured)} kernel variants x {len(capabilities)} targets, {failures} failed")
    return 1 if failures or not captured else 0


if __name__ == "__main__":
    sys.exit(main([int(c) for c in sys.argv[1:]] or [90]))

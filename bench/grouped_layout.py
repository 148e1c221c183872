"""Expert SwiGLU through torch._grouped_mm: which weight memory layout is fastest, forward and
forward+backward, at the Mixtral-8x7B layer shape.

    python bench/grouped_layout.py

"n-major": w1/w3 stored [E, d, f] row-major (as moekit's parameters are created);
"k-major": the same logical [E, d, f] tensors stored as the transpose of [E, f, d] (the layout of
nn.Linear weights, contiguous along the reduction dimension).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cuda_time_ms, env_info, gpu_tag, matmul_tflops, write_result  # noqa: E402
from moekit.ops.experts import swiglu_grouped  # noqa: E402


def main():
    E, d, f, N, k = 8, 4096, 14336, 8192, 2
    M = N * k
    torch.manual_seed(0)
    counts = torch.bincount(torch.randint(0, E, (M,), device="cuda"), minlength=E)
    x = torch.randn(M, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, d, device="cuda", dtype=torch.bfloat16)
    flops = 3 * 2 * M * d * f
    peak = matmul_tflops()

    def make(layout):
        def w(a, b):
            if layout == "n-major":
                return (torch.randn(E, a, b, device="cuda", dtype=torch.bfloat16) * a ** -0.5).requires_grad_()
            return (torch.randn(E, b, a, device="cuda", dtype=torch.bfloat16) * a ** -0.5).transpose(1, 2).detach().requires_grad_()
        return w(d, f), w(d, f), w(f, d)

    results = []
    ref = None
    for layout in ("n-major", "k-major"):
        torch.manual_seed(1)
        w1, w3, w2 = make(layout)
        if ref is None:
            ref = [t.detach().contiguous() for t in (w1, w3, w2)]
        else:  # same values, other layout
            with torch.no_grad():
                for t, r in zip((w1, w3, w2), ref):
                    t.copy_(r)

        def fwd():
            with torch.no_grad():
                swiglu_grouped(x, w1, w3, w2, counts, dropless=True)

        def fwd_bwd():
            for t in (x, w1, w3, w2):
                t.grad = None
            swiglu_grouped(x, w1, w3, w2, counts, dropless=True).backward(dy)

        tf, tfb = cuda_time_ms(fwd, iters=20), cuda_time_ms(fwd_bwd, iters=20)
        results.append({"layout": layout, "fwd_ms": tf, "fwd_bwd_ms": tfb, "fwd_tflops": flops / tf / 1e9,
                        "fwd_bwd_tflops": 3 * flops / tfb / 1e9})
        print(results[-1], flush=True)
    write_result(f"grouped_layout_{gpu_tag()}", {"bench": "grouped_layout", **env_info(), "matmul_peak_tflops": peak,
                                                 "results": results})
    print(f"peak {peak:.0f} TFLOP/s")


if __name__ == "__main__":
    main()

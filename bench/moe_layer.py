"""MoE layer forward and forward+backward at the Mixtral-8x7B layer shape: moekit vs HF
transformers' MixtralSparseMoeBlock (each of its experts implementations), same weights, same
process, against the dense bf16 matmul rate measured in the same run.

    python bench/moe_layer.py                      # d 4096, f 14336, 8 experts, top-2, 8192 tokens
    python bench/moe_layer.py --tokens 4096 --hf-impls grouped_mm
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cuda_time_ms, env_info, gpu_tag, matmul_tflops, rel_err, write_result  # noqa: E402
from moekit.config import ModelConfig  # noqa: E402
from moekit.model.moe import MoELayer  # noqa: E402


def hf_block(cfg: ModelConfig, impl: str, layer: MoELayer):
    """HF MixtralSparseMoeBlock holding the same weights as `layer`."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hcfg = MixtralConfig(hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim, num_local_experts=cfg.n_experts,
                         num_experts_per_tok=cfg.top_k, router_jitter_noise=0.0)
    hcfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(hcfg).to("cuda", torch.bfloat16)
    E, d, f = cfg.n_experts, cfg.d_model, cfg.ffn_dim
    w1, w3, w2 = layer.experts.w1.data, layer.experts.w3.data, layer.experts.w2.data  # [E,d,f] [E,d,f] [E,f,d]
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        ex = block.experts
        if hasattr(ex, "gate_up_proj"):  # fused layout (transformers 5)
            gu, down = ex.gate_up_proj, ex.down_proj
            if tuple(gu.shape) == (E, 2 * f, d):
                gu[:, :f].copy_(w1.transpose(1, 2)), gu[:, f:].copy_(w3.transpose(1, 2))
            elif tuple(gu.shape) == (E, d, 2 * f):
                gu[..., :f].copy_(w1), gu[..., f:].copy_(w3)
            else:
                raise RuntimeError(f"unknown gate_up_proj shape {tuple(gu.shape)}")
            down.copy_(w2.transpose(1, 2) if tuple(down.shape) == (E, d, f) else w2)
        else:  # one module per expert (transformers 4)
            for e, m in enumerate(ex):
                m.w1.weight.copy_(w1[e].T), m.w3.weight.copy_(w3[e].T), m.w2.weight.copy_(w2[e].T)
    return block


def first(out):
    return out[0] if isinstance(out, tuple) else out


def bench(name: str, fn_fwd, params, x, dy, flops_fwd: float, peak: float, iters: int) -> dict:
    def fwd():
        with torch.no_grad():
            fn_fwd(x)

    def fwd_bwd():
        x.grad = None
        for p in params:
            p.grad = None
        first(fn_fwd(x)).backward(dy)

    t_f = cuda_time_ms(fwd, warmup=3, iters=iters)
    t_fb = cuda_time_ms(fwd_bwd, warmup=3, iters=iters)
    r = {"impl": name, "fwd_ms": t_f, "fwd_bwd_ms": t_fb,
         "fwd_tflops": flops_fwd / t_f / 1e9, "fwd_bwd_tflops": 3 * flops_fwd / t_fb / 1e9}
    r["fwd_bwd_frac_of_matmul_peak"] = r["fwd_bwd_tflops"] / peak
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--hf-impls", default="grouped_mm,eager")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(moekit layer)")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=args.d_model, ffn_dim=args.ffn, n_experts=args.experts, top_k=args.top_k,
                      n_heads=32, n_kv_heads=8)
    layer = MoELayer(cfg).to("cuda", torch.bfloat16)
    with torch.no_grad():  # std chosen so routing is not degenerate and activations stay O(1)
        layer.router.weight.normal_(0, 0.02)
        for w in (layer.experts.w1, layer.experts.w3):
            w.normal_(0, cfg.d_model ** -0.5)
        layer.experts.w2.normal_(0, cfg.ffn_dim ** -0.5)
    N, d, f, E, k = args.tokens, cfg.d_model, cfg.ffn_dim, cfg.n_experts, cfg.top_k
    flops_fwd = N * k * 3 * 2 * d * f + 2 * N * d * E  # expert GEMMs + router
    peak = matmul_tflops()
    x = torch.randn(N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(N, d, device="cuda", dtype=torch.bfloat16)

    # numerics: the fast path against a float64 reference on fresh random inputs
    xs = torch.randn(min(N, 2048), d, device="cuda", dtype=torch.bfloat16)
    ref64 = MoELayer(cfg).to("cuda", torch.float64)
    ref64.load_state_dict({k_: v.double() for k_, v in layer.state_dict().items()})
    ref64.experts.impl = "loop"
    xr = xs.double().requires_grad_()
    yr = ref64(xr)[0]
    gr = torch.randn_like(yr)
    yr.backward(gr)
    xf = xs.clone().requires_grad_()
    yf = layer(xf)[0]
    yf.backward(gr.to(torch.bfloat16))
    numerics = {"out_rel_err": rel_err(yf, yr), "dx_rel_err": rel_err(xf.grad, xr.grad)}
    for n_, p in layer.named_parameters():
        numerics[f"d{n_}_rel_err"] = rel_err(p.grad, dict(ref64.named_parameters())[n_].grad)
    layer.zero_grad(set_to_none=True)

    results = [bench("moekit", layer, list(layer.parameters()), x, dy, flops_fwd, peak, args.iters)]
    if args.compile:
        compiled = torch.compile(layer)
        results.append(bench("moekit-compiled", compiled, list(layer.parameters()), x, dy, flops_fwd, peak, args.iters))
    for impl in [s for s in args.hf_impls.split(",") if s]:
        try:
            block = hf_block(cfg, impl, layer)
            with torch.no_grad():
                numerics[f"hf_{impl}_vs_moekit_out_rel_err"] = rel_err(first(block(xs[None]))[0], yr)
            results.append(bench(f"hf-{impl}", lambda t: first(block(t[None]))[0], list(block.parameters()),
                                 x, dy, flops_fwd, peak, args.iters))
            del block
        except Exception as e:  # report, keep the other numbers
            results.append({"impl": f"hf-{impl}", "error": f"{type(e).__name__}: {e}"[:300]})
        torch.cuda.empty_cache()

    payload = {"bench": "moe_layer", **env_info(), "shape": vars(args), "matmul_peak_tflops": peak,
               "flops_fwd": flops_fwd, "numerics": numerics, "results": results}
    path = write_result(f"moe_layer_{gpu_tag()}", payload)
    print(f"dense bf16 matmul peak (measured): {peak:.0f} TFLOP/s; numerics vs float64: "
          + ", ".join(f"{k_} {v:.2e}" for k_, v in numerics.items()))
    print(f"{'impl':18s} {'fwd ms':>8s} {'fwd TF/s':>9s} {'f+b ms':>8s} {'f+b TF/s':>9s} {'of peak':>8s}")
    for r in results:
        if "error" in r:
            print(f"{r['impl']:18s} {r['error']}")
        else:
            print(f"{r['impl']:18s} {r['fwd_ms']:8.2f} {r['fwd_tflops']:9.0f} {r['fwd_bwd_ms']:8.2f} "
                  f"{r['fwd_bwd_tflops']:9.0f} {r['fwd_bwd_frac_of_matmul_peak']:8.1%}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

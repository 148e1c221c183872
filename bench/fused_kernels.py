"""Tile sweep of the fused decode kernels at one row: the GEMV kernels of a decode step (fused QKV,
output projection, LM head, experts' gate/up and down) over a grid of tiles, each timed with CUDA
events after warm-up and reported as a share of the measured copy bandwidth. It shows which
tiles the autotuner should be offered (moekit/infer/fused_decode.py).

    python bench/fused_kernels.py --presets bench-1b,bench-decode
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import copy_tbps, cuda_time_ms, env_info, gpu_tag, write_result  # noqa: E402
from moekit.config import preset  # noqa: E402
from moekit.infer import fused_decode as fd  # noqa: E402


TILES = ((32, 64), (64, 32), (64, 64), (128, 16), (128, 32), (128, 64), (256, 16), (256, 32))  # (BN, BK)


def sweep(name, launch, configs, nbytes, bw):
    rows = []
    for cfg in configs:
        try:
            ms = cuda_time_ms(lambda c=cfg: launch(c), warmup=3, iters=30)
        except Exception as e:  # out of resources: skip the tile
            print(f"  {name} {cfg}: {type(e).__name__}", flush=True)
            continue
        rows.append({"config": cfg, "us": ms * 1e3, "share_of_copy": nbytes / (ms * 1e-3) / (bw * 1e12)})
    rows.sort(key=lambda r: r["us"])
    for r in rows[:5]:
        print(f"  {name:18s} {r['us']:8.2f} us  {r['share_of_copy']:6.1%}  {r['config']}", flush=True)
    return rows[:8]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="bench-1b,bench-decode")
    args = ap.parse_args()
    bw = copy_tbps()
    out = {"bench": "fused_kernels", **env_info(), "copy_tbps": bw, "results": {}}
    dev, dt = "cuda", torch.bfloat16
    for p in args.presets.split(","):
        cfg = preset(p)
        d, f, E, topk = cfg.d_model, cfg.ffn_dim, cfg.n_experts, cfg.top_k
        nqkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.hd
        print(f"{p}: d {d}, ffn {f}, experts {E}", flush=True)
        res = out["results"][p] = {}
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(1, d, device=dev, generator=g)
        xn = x.to(dt)
        ids = torch.tensor([[1, 5 % E]], device=dev, dtype=torch.int32)
        w1 = torch.randn(E, d, f, device=dev, dtype=dt, generator=g) * 0.02
        w3 = torch.randn_like(w1) * 0.02
        w2 = torch.randn(E, f, d, device=dev, dtype=dt, generator=g) * 0.02
        part = torch.empty(32, 2, topk, max(f, d), device=dev)
        R = topk

        def up(c):
            fd._expert_up[(R, triton.cdiv(f, c["BN"]), c["SPLIT_K"])](
                xn, ids, w1, w3, part, R, d, f, w1.stride(0), TOPK=topk, BN=c["BN"], BK=c["BK"],
                SPLIT_K=c["SPLIT_K"], num_warps=c["w"], num_stages=c["st"])

        ups = [dict(BN=bn, BK=bk, SPLIT_K=sk, w=w, st=st)
               for (bn, bk), sk, w, st in itertools.product(TILES, (1, 2, 4, 8), (4,), (1, 3))]
        res["expert_up"] = sweep("expert_up", up, ups, 2 * R * d * f * 2, bw)

        h = torch.randn(R, f, device=dev, dtype=dt, generator=g)

        def down(c):
            fd._expert_down[(R, triton.cdiv(d, c["BN"]), c["SPLIT_K"])](
                h, ids, w2, part, R, f, d, w2.stride(0), BN=c["BN"], BK=c["BK"], SPLIT_K=c["SPLIT_K"],
                num_warps=c["w"], num_stages=c["st"])

        downs = [dict(BN=bn, BK=bk, SPLIT_K=sk, w=w, st=st)
                 for (bn, bk), sk, w, st in itertools.product(TILES, (4, 8, 16, 32), (4,), (1, 3))]
        res["expert_down"] = sweep("expert_down", down, downs, R * d * f * 2, bw)

        for lname, n, k, norm in (("qkv", nqkv, d, True), ("o_proj", d, cfg.n_heads * cfg.hd, False),
                                  ("lm_head", cfg.vocab_size, d, True)):
            w = torch.randn(n, k, device=dev, dtype=dt, generator=g) * 0.02
            xi = torch.randn(1, k, device=dev, generator=g)
            gam = torch.ones(k, device=dev, dtype=dt)
            o = torch.zeros(1, n, device=dev)

            def lin(c, w=w, xi=xi, gam=gam, o=o, n=n, k=k, norm=norm):
                fd._norm_linear[(1, triton.cdiv(n, c["BN"]))](
                    xi, gam, w, o, 1, k, n, 1e-5, xi.stride(0), w.stride(0), o.stride(0), NORM=norm,
                    ACCUM=not norm, BM=c["BM"], BN=c["BN"], BK=c["BK"], USE_DOT=c["BM"] > 1, IEEE=False,
                    num_warps=c["w"], num_stages=c["st"])

            lins = [dict(BM=bm, BN=bn, BK=bk, w=w_, st=st)
                    for bm, bn, bk, w_, st in itertools.product((1, 16), (8, 16, 32, 64), (128, 256, 512), (4, 8),
                                                                (3,)) if bn * bk <= 16384 and (bm == 1 or bn >= 16)]
            res[lname] = sweep(lname, lin, lins, n * k * 2, bw)
    path = write_result(f"fused_kernels_{gpu_tag()}", out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

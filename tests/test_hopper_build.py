"""The fused decode kernels compile for Hopper (sm_90) with the options the GPU step launches them
with: programmatic dependent launch, the rotary embedding in the QKV projection, the routing at
the end of the output projection, and the next layer's weights asked of L2 by the expert down
projection while the experts stream theirs evict-first. The interpreter runs the kernels'
arithmetic (test_fused_decode.py) but not their GPU-only instructions; this builds PTX for them on
the CPU and checks that those instructions are in it.

The builds run in a child process: once a test module has switched Triton to its interpreter
(TRITON_INTERPRET=1), this process's kernels are interpreted functions, which do not compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _ptr(names: str, t: str) -> dict:
    return {n: t for n in names.split()}


DOWN = {**_ptr("h_ptr", "*bf16"), **_ptr("ids_ptr", "*i32"), **_ptr("gates_ptr", "*fp32"), **_ptr("w2_ptr", "*bf16"),
        **_ptr("part_ptr out_ptr", "*fp32"), **_ptr("sem_ptr", "*i32"), **_ptr("B R F D E stride_we stride_ob", "i32"),
        "nx1_ptr": "*bf16", "nx1_n": "i32", "nx2_ptr": "*bf16", "nx2_n": "i32"}
UP = {**_ptr("xn_ptr", "*bf16"), **_ptr("ids_ptr", "*i32"), **_ptr("w1_ptr w3_ptr", "*bf16"), "part_ptr": "*fp32",
      "h_ptr": "*bf16", "sem_ptr": "*i32", **_ptr("R K F E stride_we", "i32")}
LINEAR = {"x_ptr": "*fp32", **_ptr("g_ptr w_ptr out_ptr", "*bf16"), "part_ptr": "*fp32", "sem_ptr": "*i32",
          **_ptr("B K N", "i32"), "eps": "fp32", **_ptr("stride_xb stride_wn stride_ob", "i32"), "pos_ptr": "*i64",
          **_ptr("cos_ptr sin_ptr", "*bf16"), "slot_ptr": "*i64", **_ptr("q_ptr k_ptr v_ptr", "*bf16"),
          **_ptr("rg_ptr rw_ptr rxn_ptr", "*bf16"), "rids_ptr": "*i32", "rgates_ptr": "*fp32", "rslots_ptr": "*i64",
          "rsem_ptr": "*i32", "RE": "i32", "r_eps": "fp32"}
PAGED = {**_ptr("q_ptr k_ptr v_ptr", "*bf16"), **_ptr("bt_ptr lens_ptr", "*i32"), **_ptr("acc_ptr ml_ptr", "*fp32"),
         "out_ptr": "*bf16", "sem_ptr": "*i32",
         **_ptr("stride_qb stride_qh stride_kb stride_kt stride_kh stride_btb", "i32"), "sm_scale": "fp32",
         "n_splits": "i32"}
ATTN_WO = {**_ptr("q_ptr k_ptr v_ptr", "*bf16"), **_ptr("bt_ptr lens_ptr", "*i32"), "w_ptr": "*bf16",
           **_ptr("out_ptr part_ptr", "*fp32"), "sem_ptr": "*i32", **_ptr("B N", "i32"),
           **_ptr("stride_qb stride_qh stride_kb stride_kt stride_kh stride_btb stride_wn stride_ob", "i32"),
           "sm_scale": "fp32"}
ROUTE = {"x_ptr": "*fp32", **_ptr("g_ptr wr_ptr xn_ptr", "*bf16"), "ids_ptr": "*i32", "gates_ptr": "*fp32",
         "slots_ptr": "*i32", **_ptr("K E", "i32"), "eps": "fp32", "stride_xb": "i32"}
EXPERT = dict(TOPK=2, RP=16, EP=8, IEEE=False, BM=16, BN=128, BK=64, PDL=True)
PROJ = dict(BM=16, BN=64, BK=128, USE_DOT=True, IEEE=False, PDL=True)

# name -> (kernel, argument types, constants, num_warps, num_stages)
BUILDS = {
    "down_next": ("triton_experts._expert_down", DOWN, dict(EXPERT, SPLIT_K=4, EVICT="evict_first", NEXT=True, LINE=64), 4, 3),
    "down_plain": ("triton_experts._expert_down", DOWN, dict(EXPERT, SPLIT_K=4, EVICT="", NEXT=False, LINE=64), 4, 3),
    "up_evict_first": ("triton_experts._expert_up", UP, dict(EXPERT, SPLIT_K=2, EVICT="evict_first"), 4, 3),
    "qkv_rope": ("_norm_linear", LINEAR, dict(PROJ, NORM=True, ACCUM=False, SPLIT_K=8, ROPE=True, H=16, HKV=4, HALF=64), 4, 4),
    "qkv": ("_norm_linear", LINEAR, dict(PROJ, NORM=True, ACCUM=False, SPLIT_K=8, ROPE=False), 4, 4),
    "qkv_plain": ("_norm_linear", LINEAR, dict(PROJ, NORM=True, ACCUM=False, SPLIT_K=8, ROPE=False, PRELOAD=False), 4, 4),
    **{f"wo_route_split{sk}": ("_norm_linear", {**LINEAR, "x_ptr": "*bf16", "out_ptr": "*fp32"},
                               dict(PROJ, NORM=False, ACCUM=True, SPLIT_K=sk, ROUTE=True, EP=8, RBK=2048, TOPK=2,
                                    RENORM=True), 4, 4) for sk in (1, 4)},
    "down_self_prefetch": ("triton_experts._expert_down", DOWN, dict(EXPERT, SPLIT_K=4, EVICT="", NEXT=False, LINE=64, PRE=256), 4, 3),
    "wo_preload": ("_norm_linear", {**LINEAR, "x_ptr": "*bf16", "out_ptr": "*fp32"},
                   dict(PROJ, NORM=False, ACCUM=True, SPLIT_K=4, PRELOAD=True), 4, 4),
    "qkv_rope_self_prefetch": ("_norm_linear", LINEAR, dict(PROJ, NORM=True, ACCUM=False, SPLIT_K=4, ROPE=True, H=16,
                                                            HKV=4, HALF=64, PRE=1024), 4, 4),
    "paged_self_prefetch": ("triton_paged._paged_decode_split", PAGED,
                            dict(G=4, GP=16, HD=128, PAGE=16, TOK=64, IEEE=False, PDL=True, PRE=True), 4, 3),
    "attn_wo": ("triton_attn_wo._attn_wo", ATTN_WO,
                dict(G=4, GP=16, HD=128, PAGE=16, TOK=64, BN=64, IEEE=False, PDL=True), 8, 3),
    "route": ("triton_route._route", ROUTE, dict(EP=8, BK=2048, TOPK=2, RENORM=True, PDL=True), 8, 3),
    "paged": ("triton_paged._paged_decode_split", PAGED, dict(G=4, GP=16, HD=128, PAGE=16, TOK=64, IEEE=False, PDL=True), 4, 3),
    "argmax": ("triton_argmax._argmax_rows", {"x_ptr": "*fp32", "stride_x": "i32", **_ptr("out_ptr part_i_ptr sem_ptr", "*i32"),
                                               "part_v_ptr": "*fp32", "V": "i32"}, dict(BV=1024, SP=32, PDL=True), 4, 3),
    "embed_prev": ("_embed_stage", {**_ptr("stage_ptr prev_ptr", "*i32"), "stride_s": "i32", "w_ptr": "*bf16",
                                    "x_ptr": "*fp32", "D": "i32"}, dict(BD=1024, PREV=True), 4, 3),
}
MARKS = ("prefetch.global.L2", "evict_first", "griddepcontrol.wait", "griddepcontrol.launch_dependents", "atom")


def _build_all() -> dict:
    """In the child process: build each entry of BUILDS for sm_90; which marks its PTX holds."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import importlib

    out = {}
    for name, (kernel, types, consts, warps, stages) in BUILDS.items():
        module, _, kernel = kernel.rpartition(".")
        fn = getattr(importlib.import_module(f"moekit.infer.{module or 'fused_decode'}"), kernel)
        # constants left out take the kernel's defaults (some Triton versions need them all named)
        consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.name not in consts}, **consts}
        sig = {**types, **{c: "constexpr" for c in consts}}
        try:
            k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps, "num_stages": stages})
        except Exception as e:  # reported by name to the test, which fails on it (or skips without ptxas)
            out[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            continue
        ptx = k.asm["ptx"]
        out[name] = {m: m in ptx for m in MARKS}
        # a prefetch issued before the wait for the previous kernel (the first of each in the PTX)
        out[name]["prefetch_before_wait"] = 0 <= ptx.find("prefetch.global.L2") < ptx.find("griddepcontrol.wait")
        out[name]["load_before_wait"] = 0 <= ptx.find("ld.global") < ptx.find("griddepcontrol.wait")
    return out


@pytest.fixture(scope="module")
def built() -> dict:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    # a missing toolchain skips; an error of ptxas itself (bad PTX) fails its test
    toolchain = [v["error"] for v in res.values()
                 if "error" in v and (v["error"].startswith("FileNotFoundError") or "cannot find" in v["error"].lower())]
    if toolchain:
        pytest.skip(f"no CUDA toolchain for Triton here: {toolchain[0][:200]}")
    return res


def _marks(built: dict, name: str) -> dict:
    assert "error" not in built[name], built[name].get("error")
    return built[name]


@pytest.mark.parametrize("nxt", [True, False])
def test_expert_down_prefetches_the_next_weights_only_when_asked(built, nxt):
    m = _marks(built, "down_next" if nxt else "down_plain")
    assert m["prefetch.global.L2"] == nxt and m["evict_first"] == nxt
    assert m["griddepcontrol.wait"]  # PDL


def test_expert_up_streams_evict_first(built):
    m = _marks(built, "up_evict_first")
    assert m["evict_first"] and m["griddepcontrol.wait"]


@pytest.mark.parametrize("name", ["qkv_rope", "qkv"])
def test_qkv_projection_builds_with_and_without_rotary(built, name):
    assert _marks(built, name)["griddepcontrol.launch_dependents"]


@pytest.mark.parametrize("split_k", [1, 4])
def test_output_projection_builds_with_routing(built, split_k):
    assert _marks(built, f"wo_route_split{split_k}")["atom"]  # the count of finished tiles


@pytest.mark.parametrize("name", ["route", "qkv_rope", "wo_preload"])
def test_inputs_no_kernel_writes_are_loaded_before_the_wait(built, name):
    """The router's and the norm's weights (routing), the rotation's cos, sin and cache slots (the
    QKV projection), a projection's first block of weights (PRELOAD): loaded before waiting for
    the kernel before."""
    m = _marks(built, name)
    assert m["griddepcontrol.wait"] and m["load_before_wait"]


def test_attention_in_the_output_projection_builds(built):
    m = _marks(built, "attn_wo")
    assert m["griddepcontrol.wait"] and m["atom"]  # PDL; the count of finished KV-head shares


def test_greedy_tokens_and_their_lookup_build(built):
    """The decode graphs' argmax (after the LM head, PDL) and the embedding of tokens taken from
    the step before."""
    m = _marks(built, "argmax")
    assert m["griddepcontrol.wait"] and m["atom"]  # PDL; the count of the row's finished blocks
    _marks(built, "embed_prev")


def test_a_projection_without_rotary_or_preload_loads_nothing_before_the_wait(built):
    assert not _marks(built, "qkv_plain")["load_before_wait"]


@pytest.mark.parametrize("name", ["down_self_prefetch", "qkv_rope_self_prefetch", "paged_self_prefetch", "paged"])
def test_self_prefetch_is_asked_before_the_wait_only_when_on(built, name):
    """MOEKIT_PREFETCH_SELF: a kernel asks L2 for its own first weights (or pages) before it waits
    for the kernel before it; off, it asks for nothing."""
    m = _marks(built, name)
    assert m["griddepcontrol.wait"]
    assert m["prefetch_before_wait"] == m["prefetch.global.L2"] == ("self_prefetch" in name)


if __name__ == "__main__":  # the child process
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(_build_all()))

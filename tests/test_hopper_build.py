"""The fused decode kernels compile for Hopper (sm_90) with the options the GPU step launches them
with: programmatic dependent launch, the rotary embedding in the QKV projection, and the next
layer's weights asked of L2 by the expert down projection while the experts stream theirs
evict-first. The interpreter runs the kernels' arithmetic (test_fused_decode.py) but not their
GPU-only instructions; this builds PTX for them on the CPU and checks that those instructions
are in it."""

import pytest

triton = pytest.importorskip("triton")
from moekit.infer import fused_decode as fd  # noqa: E402


def _compile(fn, types: dict, consts: dict, **options):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**types, **{c: "constexpr" for c in consts}}
    try:
        return triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=options)
    except (ImportError, FileNotFoundError, RuntimeError) as e:
        if "ptxas" in str(e) or "libdevice" in str(e) or isinstance(e, (ImportError, FileNotFoundError)):
            pytest.skip(f"no CUDA toolchain for Triton here: {e}")
        raise


def _ptr(names: str, t: str) -> dict:
    return {n: t for n in names.split()}


DOWN = {**_ptr("h_ptr", "*bf16"), **_ptr("ids_ptr", "*i32"), **_ptr("gates_ptr", "*fp32"), **_ptr("w2_ptr", "*bf16"),
        **_ptr("part_ptr out_ptr", "*fp32"), **_ptr("sem_ptr", "*i32"), **_ptr("B R F D stride_we stride_ob", "i32"),
        "nx1_ptr": "*bf16", "nx1_n": "i32", "nx2_ptr": "*bf16", "nx2_n": "i32"}
UP = {**_ptr("xn_ptr", "*bf16"), **_ptr("ids_ptr", "*i32"), **_ptr("w1_ptr w3_ptr", "*bf16"), "part_ptr": "*fp32",
      "h_ptr": "*bf16", "sem_ptr": "*i32", **_ptr("R K F stride_we", "i32")}
LINEAR = {"x_ptr": "*fp32", **_ptr("g_ptr w_ptr out_ptr", "*bf16"), "part_ptr": "*fp32", "sem_ptr": "*i32",
          **_ptr("B K N", "i32"), "eps": "fp32", **_ptr("stride_xb stride_wn stride_ob", "i32"), "pos_ptr": "*i64",
          **_ptr("cos_ptr sin_ptr", "*bf16"), "slot_ptr": "*i64", **_ptr("q_ptr k_ptr v_ptr", "*bf16")}


@pytest.mark.parametrize("nxt", [True, False])
def test_expert_down_prefetches_the_next_weights_only_when_asked(nxt):
    k = _compile(fd._expert_down, DOWN, dict(TOPK=2, RP=16, IEEE=False, BM=16, BN=128, BK=64, SPLIT_K=4, PDL=True,
                                             EVICT="evict_first" if nxt else "", NEXT=nxt, LINE=64),
                 num_warps=4, num_stages=3)
    ptx = k.asm["ptx"]
    assert ("prefetch.global.L2" in ptx) == nxt and ("evict_first" in ptx) == nxt
    assert "griddepcontrol.wait" in ptx  # PDL


def test_expert_up_streams_evict_first():
    k = _compile(fd._expert_up, UP, dict(TOPK=2, RP=16, IEEE=False, BM=16, BN=128, BK=64, SPLIT_K=2, PDL=True,
                                         EVICT="evict_first"), num_warps=4, num_stages=3)
    assert "evict_first" in k.asm["ptx"] and "griddepcontrol.wait" in k.asm["ptx"]


@pytest.mark.parametrize("rope", [True, False])
def test_qkv_projection_builds_with_and_without_rotary(rope):
    k = _compile(fd._norm_linear, LINEAR, dict(NORM=True, ACCUM=False, BM=16, BN=64, BK=128, USE_DOT=True, IEEE=False,
                                               SPLIT_K=8, PDL=True, ROPE=rope, H=16, HKV=4, HALF=64),
                 num_warps=4, num_stages=4)
    assert "griddepcontrol.launch_dependents" in k.asm["ptx"]

"""The FP8 flow of one MoE layer and of a linear layer, written out by hand over the op set.

This is the dataflow the compiler's rewrite produces (FP8-Flow-MoE, arXiv 2511.02302), kept as
plain autograd functions so it can be run, tested and timed on its own:

forward  : x --quantize_1x128 (cast 1)--> permute_pad_fp8 --> grouped_gemm_fp8 (FC1)
           --> swiglu_quant_save (probs fused; also h in FP8) --> grouped_gemm_fp8 (FC2)
           --> unpermute (BF16)
backward : dy --quantize_1x128 (cast 2)--> permute_pad_fp8 --> FC2 dgrad / wgrad
           (wgrad operands from scaling_aware_transpose, b's scales as 128x128 blocks) -->
           swiglu_quant_backward (FP8 dh, dprobs) --> FC1 dgrad / wgrad (transpose again)
           --> unpermute (BF16, sums the slots)

Saved for backward: the FP8 input (in token order: the FC1 wgrad transposes it through the
gather's index, `scaling_aware_transpose(..., src_row)`) and the FP8 SwiGLU output with their
scales, the quantized weights, and the FC1 output h in FP8 (1x128 tiles, written by the SwiGLU
op from the same pass over h; the SwiGLU backward reads it dequantized, as DeepSeek-V3 does).
The two activation/gradient casts left are x and dy; the weights are quantized once per step
in 128x128 blocks, which serve fprop and dgrad alike: `quantize_128x128_dual` writes the same
bytes a second time transposed, because the tensor cores want the contracted dim of B
contiguous (reading W [N, K] along N in the GEMM ran at 5% of cuBLAS on the H100).
"""

from __future__ import annotations

import torch

from .kernels import gemm, permute, quantize, swiglu, transpose  # noqa: F401  (registers ops)
from .recipe import DEFAULT, TILE, Recipe

ops = torch.ops.fp8flow


class _MoEExpertsFlow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topw, topi, w13, w2, align):
        E = w13.shape[0]
        maps = permute.moe_routing_maps(topi, E, align)
        xq, xs = ops.quantize_1x128(x)
        xq_p, xs_p = ops.permute_pad_fp8(xq, xs, maps.src_row)
        w13q, w13s, w13qT, w13sT = ops.quantize_128x128_dual(w13)
        w2q, w2s, w2qT, w2sT = ops.quantize_128x128_dual(w2)
        h = ops.grouped_gemm_fp8(xq_p, xs_p, w13q, w13s, maps.offs_pad, True, x.dtype)
        flat_w = topw.reshape(-1).float()
        probs_p = torch.where(maps.src_slot >= 0, flat_w[maps.src_slot.clamp(min=0).long()], 0.0)
        aq, as_, hq, hs = ops.swiglu_quant_save(h, probs_p)
        y = ops.grouped_gemm_fp8(aq, as_, w2q, w2s, maps.offs_pad, True, x.dtype)
        out = ops.unpermute(y, maps.pos, None)
        # the backward transposes the tokens through the gather's index: keep them ungathered
        ctx.save_for_backward(xq, xs, aq, as_, hq, hs, probs_p, w13qT, w13sT, w2qT, w2sT,
                              maps.src_row, maps.pos, maps.offs_pad)
        ctx.dtypes = (x.dtype, topw.dtype, w13.dtype, w2.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        (xq, xs, aq, as_, hq, hs, probs_p, w13qT, w13sT, w2qT, w2sT,
         src_row, pos, offs_pad) = ctx.saved_tensors
        x_dtype, w_dtype, w13_dtype, w2_dtype = ctx.dtypes
        dq, ds = ops.quantize_1x128(dout.contiguous())
        dq_p, ds_p = ops.permute_pad_fp8(dq, ds, src_row)
        # FC2: dA = dY_p @ W2_g, dW2_g = dY_g^T A_g
        da = ops.grouped_gemm_fp8(dq_p, ds_p, w2qT, w2sT, offs_pad, True, x_dtype)
        dyT, dyT_s = ops.scaling_aware_transpose(dq_p, ds_p, offs_pad)
        aT, aT_s = ops.scaling_aware_transpose(aq, as_, offs_pad)
        dw2 = ops.grouped_gemm_fp8_wgrad(dyT, dyT_s, aT, _blocks(aT_s), offs_pad, torch.float32)
        # SwiGLU backward emits FP8 dh (feeds FC1 dgrad) and the probs gradient.
        dhq, dhs, dprobs_p = ops.swiglu_quant_backward(da, hq, probs_p, hs)
        dx_p = ops.grouped_gemm_fp8(dhq, dhs, w13qT, w13sT, offs_pad, True, x_dtype)
        dhT, dhT_s = ops.scaling_aware_transpose(dhq, dhs, offs_pad)
        xT, xT_s = ops.scaling_aware_transpose(xq, xs, offs_pad, 1, src_row)
        dw13 = ops.grouped_gemm_fp8_wgrad(dhT, dhT_s, xT, _blocks(xT_s), offs_pad, torch.float32)
        dx = ops.unpermute(dx_p, pos, None)
        safe = pos.clamp(min=0).long()
        dtopw = torch.where(pos >= 0, dprobs_p[safe], 0.0).to(w_dtype)
        return dx, dtopw, None, dw13.to(w13_dtype), dw2.to(w2_dtype), None


def _blocks(sT: torch.Tensor) -> torch.Tensor:
    """A transpose's scales as the 128x128 blocks they are (every 128th row), the form in which
    cuBLAS runs the wgrad faster (passes/block_scales.py)."""
    return sT[::TILE].contiguous()


def moe_experts_fp8_flow(x: torch.Tensor, topw: torch.Tensor, topi: torch.Tensor,
                         w13: torch.Tensor, w2: torch.Tensor, recipe: Recipe = DEFAULT
                         ) -> torch.Tensor:
    """Routed experts of an MoE layer in the FP8 flow.

    x [T, H] (bf16), topw [T, k] routing weights, topi [T, k] expert ids, w13 [E, 2I, H] (gate
    rows then up rows), w2 [E, H, I]. Returns sum_j topw[t, j] * FFN_{topi[t, j]}(x[t]) as [T, H].
    """
    recipe.check_supported()
    return _MoEExpertsFlow.apply(x.contiguous(), topw, topi, w13.contiguous(), w2.contiguous(),
                                 recipe.group_align)


class _LinearFlow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        xq, xs = ops.quantize_1x128(x)
        wq, ws, wqT, wsT = ops.quantize_128x128_dual(w)
        y = ops.gemm_fp8(xq, xs, wq, ws, True, x.dtype)
        ctx.save_for_backward(xq, xs, wqT, wsT)
        ctx.dtypes = (x.dtype, w.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wqT, wsT = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        dq, ds = ops.quantize_1x128(dy.contiguous())
        dx = ops.gemm_fp8(dq, ds, wqT, wsT, True, x_dtype)
        dyT, dyT_s = ops.scaling_aware_transpose(dq, ds, None)
        xT, xT_s = ops.scaling_aware_transpose(xq, xs, None)
        dw = ops.gemm_fp8_wgrad(dyT, dyT_s, xT, _blocks(xT_s), torch.float32)
        return dx, dw.to(w_dtype)


def linear_fp8_flow(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = x @ w^T in the FP8 flow (x [M, K] with K and the output dim multiples of 128)."""
    return _LinearFlow.apply(x.contiguous(), w.contiguous())

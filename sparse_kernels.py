"""Packed sparse Linear for inference: y = x @ W.T reading only the compressed weight W [D, C] (out, in).

    model = sparse_kernels.pack_model(model, '2:4')  # or 'block16'; decoder Linears must already hold exact zeros

2:4      vals [D, C/2] + meta [D, ceil(C/8)] uint8: per group of 4 along C a 4-bit code i0 | i1 << 2
         (kept positions, i0 < i1), two groups a byte. fp16: 9/16 of the dense bytes. Our Triton kernel.
block16  torch's BSR format: the kept 16x16 tiles [n, 16, 16], crow [D/16 + 1] and col [n] indices (CSR over tiles);
         F.linear runs torch's own Triton BSR kernel on CUDA (fp16, bf16) and its sparse matmul on CPU (fp32)."""
import os, warnings
import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'  # CPU: Triton if set at import (bf16 wrong), else the twin
warnings.filterwarnings('ignore', 'Sparse BSR tensor support is in beta')  # public, documented, and what we mean

# ----------------------------------------------------------------------------------------------------------- formats
def pack24(w):
    D, C = w.shape
    g = w.reshape(D, C // 4, 4)
    if bad := int(((g != 0).sum(-1) > 2).sum()):
        raise ValueError(f"weight [{D}, {C}] is not 2:4: {bad} of {D * C // 4} groups of 4 have more than 2 "
                         "nonzeros; harden the mask (exactly 2 per group) and zero the weight before packing")
    idx = (g == 0).to(torch.uint8).argsort(dim=-1, stable=True)[..., :2].sort(-1).values  # [D, C/4, 2] nonzeros first
    code = (idx[..., 0] | idx[..., 1] << 2).to(torch.uint8)       # [D, C/4]
    code = F.pad(code, (0, code.shape[1] % 2))                    # odd group count: pad to whole bytes
    return g.gather(-1, idx).reshape(D, C // 2), code[:, 0::2] | code[:, 1::2] << 4   # vals, meta

def unpack24(vals, meta):
    D, C = vals.shape[0], vals.shape[1] * 2
    code = torch.stack((meta & 15, meta >> 4), -1).reshape(D, -1)[:, :C // 4].long()
    idx = torch.stack((code & 3, code >> 2), -1)                  # [D, C/4, 2]
    return vals.new_zeros(D, C // 4, 4).scatter_(-1, idx, vals.reshape(D, C // 4, 2)).reshape(D, C)

def pack_block16(w):
    bsr = w.to_sparse_bsr(16)
    return bsr.values(), bsr.crow_indices(), bsr.col_indices()

def bsr(tiles, crow, col, C):  # the BSR tensor [D, C] over the packed buffers (no copy; pack_block16 made them valid)
    return torch.sparse_bsr_tensor(crow, col, tiles, (16 * (len(crow) - 1), C), check_invariants=False)

def matmul_block16(x, tiles, crow, col, bias=None):
    return F.linear(x, bsr(tiles, crow, col, x.shape[-1]), bias)

# PyTorch twins: the spec each kernel must match
def matmul24_ref(x, vals, meta, bias=None):
    return F.linear(x, unpack24(vals, meta), bias)
def matmul_block16_ref(x, tiles, crow, col, bias=None):
    return F.linear(x, bsr(tiles, crow, col, x.shape[-1]).to_dense(), bias)

# ------------------------------------------------ the 2:4 Triton kernel: a program computes y[BM rows, BN cols] in fp32
@triton.jit
def _matmul24_kernel(x_ptr, v_ptr, m_ptr, y_ptr, M, D, C, CM,
                     PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, C, BK):
        rk, rv, rc = k0 + tl.arange(0, BK), k0 // 2 + tl.arange(0, BK // 2), k0 // 8 + tl.arange(0, BK // 8)
        x = tl.load(x_ptr + rm[:, None] * C + rk, mask=(rm[:, None] < M) & (rk < C), other=0.)
        v = tl.load(v_ptr + rn[:, None] * (C // 2) + rv, mask=(rn[:, None] < D) & (rv < C // 2), other=0.)
        m = tl.load(m_ptr + rn[:, None] * CM + rc, mask=(rn[:, None] < D) & (rc < CM), other=0)
        code = tl.interleave(m & 15, m >> 4)[:, :, None]          # [BN, BK/4, 1] one code per group
        v0, v1 = tl.split(tl.reshape(v, (BN, BK // 4, 2)))        # [BN, BK/4] each
        p = tl.arange(0, 4)                                       # slot in the group; i0 != i1, so the sum is exact
        w = tl.where((code & 3) == p, v0[:, :, None], 0.) + tl.where((code >> 2) == p, v1[:, :, None], 0.)
        acc += tl.dot(x, tl.trans(tl.reshape(w, (BN, BK))), input_precision=PREC)   # w: dense [BN, BK] tile
    tl.store(y_ptr + rm[:, None] * D + rn, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn < D))

# x [..., C] -> y [..., D]. Decode (M <= 16): BM = 16 is tl.dot's minimum; BN, BK the best of 48 configurations on an
# H200 (M = 1 and 16, [11008, 4096] fp16), yet 0.38x cuBLAS dense (README). fp32 is exact ('ieee'), not tf32.
DECODE, PREFILL = (16, 32, 256), (64, 64, 64)  # (BM, BN, BK) for M <= 16 and above; bench/kernel_speed.py compiles both
def matmul24(x, vals, meta, bias=None):
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    (M, C), D = x2.shape, len(vals)
    BM, BN, BK = DECODE if M <= 16 else PREFILL
    y = x2.new_empty(M, D)
    prec = 'ieee' if x.dtype == torch.float32 else 'tf32'
    _matmul24_kernel[triton.cdiv(M, BM), triton.cdiv(D, BN)](x2, vals, meta, y, M, D, C, len(meta[0]), prec, BM, BN, BK)
    return (y if bias is None else y + bias).reshape(*x.shape[:-1], D)  # the bias: one add, outside the kernel

# ------------------------------------------------------------------------------------------------------- module swap
FORMATS = {'2:4': (('vals', 'meta'), pack24, matmul24, matmul24_ref),  # buffers, pack, kernel, twin
           'block16': (('tiles', 'crow', 'col'), pack_block16, matmul_block16, matmul_block16_ref)}

class PackedLinear(nn.Module):
    """Drop-in nn.Linear storing only the packed weight, as FORMATS[pattern] names its buffers."""
    def __init__(self, linear, pattern):
        super().__init__()
        self.names, pack, self.kernel, self.twin = FORMATS[pattern]
        for name, t in zip(self.names, pack(linear.weight.detach())):
            self.register_buffer(name, t)
        self.register_buffer('bias', None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x):
        matmul = self.kernel if x.is_cuda or INTERPRET else self.twin
        return matmul(x, *[getattr(self, n) for n in self.names], self.bias)

def pack_model(model, pattern):  # swap every nn.Linear inside the decoder blocks; embeddings and lm_head stay dense
    for name, child in list(model.transformer.h.named_modules()):  # list: we swap while walking
        if isinstance(child, nn.Linear):
            model.transformer.h.set_submodule(name, PackedLinear(child, pattern))
    return model

"""Packed sparse Linear for inference: y = x @ W.T reading only the compressed weight W [D, C] (out, in).

    model = sparse_kernels.pack_model(model, '2:4')  # or 'block16'; decoder Linears must already hold exact zeros

2:4      vals [D, C/2] + meta [D, ceil(C/8)] uint8: per group of 4 along C a 4-bit code i0 | i1 << 2
         (kept positions, i0 < i1), two groups a byte. fp16: 9/16 of the dense bytes.
block16  tiles [D/16, K, 16, 16] + cols [D/16, K] int32: tiles[b, t] = W[16b:16b+16, 16*cols[b, t]:+16].T (in, out);
         K = most nonzero tiles in any 16-row band, the other bands are padded with zero tiles."""
import os
import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'  # CPU: Triton if set at import (bf16 wrong), else the twin

# ----------------------------------------------------------------------------------------------------------- formats
def _keep(nz, k):  # [..., n] bool -> [..., k] indices to store: nonzeros first, then the lowest zero slots, ascending
    return (~nz).to(torch.uint8).argsort(dim=-1, stable=True)[..., :k].sort(-1).values

def pack24(w):
    D, C = w.shape
    g = w.reshape(D, C // 4, 4)
    if bad := int(((g != 0).sum(-1) > 2).sum()):
        raise ValueError(f"weight [{D}, {C}] is not 2:4: {bad} of {D * C // 4} groups of 4 have more than 2 "
                         "nonzeros; harden the mask (exactly 2 per group) and zero the weight before packing")
    idx = _keep(g != 0, 2)                                        # [D, C/4, 2] positions in 0..3
    code = (idx[..., 0] | idx[..., 1] << 2).to(torch.uint8)       # [D, C/4]
    code = F.pad(code, (0, code.shape[1] % 2))                    # odd group count: pad to whole bytes
    return g.gather(-1, idx).reshape(D, C // 2), code[:, 0::2] | code[:, 1::2] << 4   # vals, meta

def unpack24(vals, meta):
    D, C = vals.shape[0], vals.shape[1] * 2
    code = torch.stack((meta & 15, meta >> 4), -1).reshape(D, -1)[:, :C // 4].long()
    idx = torch.stack((code & 3, code >> 2), -1)                  # [D, C/4, 2]
    return vals.new_zeros(D, C // 4, 4).scatter_(-1, idx, vals.reshape(D, C // 4, 2)).reshape(D, C)

def pack_block16(w):
    D, C = w.shape
    if D % 16 or C % 16:
        raise ValueError(f"block16 needs both dims % 16 == 0, got [{D}, {C}]")
    t = w.reshape(D // 16, 16, C // 16, 16).permute(0, 2, 3, 1)   # [D/16, C/16, 16, 16] (band, tile col, in, out)
    nz = t.flatten(2).ne(0).any(-1)                               # [D/16, C/16]
    cols = _keep(nz, int(nz.sum(1).max()))                        # [D/16, K]
    return t[torch.arange(D // 16, device=w.device)[:, None], cols].contiguous(), cols.int()

def unpack_block16(tiles, cols, C):
    B = cols.shape[0]
    t = tiles.new_zeros(B, C // 16, 16, 16)
    t[torch.arange(B, device=tiles.device)[:, None], cols.long()] = tiles
    return t.permute(0, 3, 1, 2).reshape(B * 16, C)

# PyTorch twins: the spec each kernel must match
def matmul24_ref(x, vals, meta, bias=None):
    return F.linear(x, unpack24(vals, meta), bias)
def matmul_block16_ref(x, tiles, cols, bias=None):
    return F.linear(x, unpack_block16(tiles, cols, x.shape[-1]), bias)

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
    y = torch.empty(M, D, dtype=x.dtype, device=x.device)
    prec = 'ieee' if x.dtype == torch.float32 else 'tf32'
    _matmul24_kernel[triton.cdiv(M, BM), triton.cdiv(D, BN)](x2, vals, meta, y, M, D, C, len(meta[0]), prec, BM, BN, BK)
    return (y if bias is None else y + bias).reshape(*x.shape[:-1], D)  # the bias: one add, outside the kernel

def matmul_block16(x, tiles, cols, bias=None):
    """Decode: a batched matmul over each band's kept (dense) tiles reads only them; prefill (M > 16): the twin."""
    if x.numel() > 16 * x.shape[-1]:
        return matmul_block16_ref(x, tiles, cols, bias)
    xt = x.reshape(-1, x.shape[-1] // 16, 16)[:, cols.long()].flatten(2)  # [M, D/16, K*16]: x under each kept tile
    y = torch.bmm(xt.transpose(0, 1), tiles.flatten(1, 2)).transpose(0, 1).reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias

# ------------------------------------------------------------------------------------------------------- module swap
FORMATS = {'2:4': (pack24, matmul24, matmul24_ref), 'block16': (pack_block16, matmul_block16, matmul_block16_ref)}

class PackedLinear(nn.Module):
    """Drop-in nn.Linear storing only the packed weight: vals, meta = (vals, meta) 2:4 or (tiles, cols) block16."""
    def __init__(self, linear, pattern):
        super().__init__()
        self.pattern, self.in_features, self.out_features = pattern, linear.in_features, linear.out_features
        for name, t in zip(('vals', 'meta'), FORMATS[pattern][0](linear.weight.detach())):
            self.register_buffer(name, t)
        self.register_buffer('bias', None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x):
        return FORMATS[self.pattern][1 if x.is_cuda or INTERPRET else 2](x, self.vals, self.meta, self.bias)

def pack_model(model, pattern):  # swap every nn.Linear inside the decoder blocks; embeddings and lm_head stay dense
    for module in list(model.transformer.h.modules()):  # list: we setattr while walking
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child, pattern))
    return model

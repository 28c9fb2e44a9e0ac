"""Packed sparse Linear for inference: y = x @ W.T reading only the compressed weight W [D, C] (out, in).
    model = sparse_kernels.pack_model(model, '2:4')  # or 'block16'; every Linear but lm_head must hold exact zeros
2:4      vals [D, C/2] + meta int32 [ceil(D/8), C/4]: word (r, g) holds the codes i0 | i1 << 2 (kept positions i0 < i1)
         of group g in rows 8r + j at bits 4j; a group's 2 values are one 32-bit word (fp16). 9/16 of fp16 dense.
block16  balanced ELL: each 16-row band keeps C/32 16x16 tiles (C % 32 == 0): tiles [D/16, C/32, 16, 16], col int32."""
import functools
import os
import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl
INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'  # CPU: Triton if set at import (bf16 wrong), else the twins

# ----------------------------------------------------------------------------------- formats, and the PyTorch twins
def pack24(w):
    D, C = w.shape
    g = w.reshape(D, C // 4, 4)
    if bad := int(((g != 0).sum(-1) > 2).sum()):
        raise ValueError(f"weight [{D}, {C}] is not 2:4: {bad} of {D * C // 4} groups of 4 have more than 2 "
                         "nonzeros; harden the mask (exactly 2 per group) and zero the weight before packing")
    idx = (g == 0).to(torch.uint8).argsort(dim=-1, stable=True)[..., :2].sort(-1).values  # [D, C/4, 2] nonzeros first
    code = F.pad(idx[..., 0] | idx[..., 1] << 2, (0, 0, 0, -D % 8)).view(-1, 8, C // 4)  # [D/8, 8 rows, C/4] int64
    meta = (code << 4 * torch.arange(8, device=w.device)[:, None]).sum(1).to(torch.int32)  # 8r + j: bits 4j; wraps
    return g.gather(-1, idx).reshape(D, C // 2), meta
def unpack24(vals, meta):  # the twin: W [D, C]
    rows = torch.arange(len(vals), device=meta.device)[:, None]      # [D, 1]
    code = ((meta[rows[:, 0] // 8] >> 4 * (rows % 8)) & 15)[..., None]  # [D, C/4, 1]: each row's codes
    v0, v1 = vals.view(len(vals), -1, 2, 1).unbind(2)                # [D, C/4, 1] each
    p = torch.arange(4, device=vals.device)                          # the position in a group
    return torch.where(code & 3 == p, v0, torch.where(code >> 2 == p, v1, 0)).view(len(vals), -1)

def pack_block16(w):
    D, C = w.shape
    keep = (w.view(D // 16, 16, C // 16, 16) != 0).any(3).any(1)   # [D/16, C/16] the nonzero tiles
    if bad := int((keep.sum(1) > C // 32).sum()):
        raise ValueError(f"weight [{D}, {C}] is not block16: {bad} of {D // 16} bands of 16 rows keep more than "
                         f"{C // 32} nonzero 16x16 tiles; harden the mask (half the tiles of a band) before packing")
    col = keep.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :C // 32].sort(1).values  # [D/16, C/32]
    tiles = w.view(D // 16, 16, C // 16, 16).transpose(1, 2)        # [D/16, C/16, 16, 16]
    return tiles.gather(1, col[..., None, None].expand(-1, -1, 16, 16)).contiguous(), col.int()
def unpack_block16(tiles, col):  # the twin: W [D, C], scattered in place (no transposed copy)
    D, C = 16 * len(tiles), 32 * col.shape[1]
    dense = tiles.new_zeros(D // 16, 16, C // 16, 16)
    return dense.scatter_(2, col.long()[:, None, :, None].expand(-1, 16, -1, 16), tiles.transpose(1, 2)).view(D, C)

# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def as_fp32(b, dt: tl.constexpr):  # the 16-bit element in the low bits of an int word, in fp32
    if dt == tl.bfloat16:  # an fp32's top half: one shift
        return (b << 16).to(tl.float32, bitcast=True)
    return b.to(tl.int16).to(dt, bitcast=True).to(tl.float32)
@triton.jit
def load24(v_ptr, m_ptr, rn, g, D, G):  # rows rn [BN, 1], groups g [.., GB] -> value words, codes [BN, GB]
    w = tl.load(v_ptr + rn * G + g, mask=(rn < D) & (g < G), other=0)
    c = tl.load(m_ptr + rn // 8 * G + g, mask=(rn < D) & (g < G), other=0)
    return w, c >> 4 * (rn & 7)  # this row's code in bits 0..3
@triton.jit
def dense24(w, c, dt: tl.constexpr):  # value words and codes [BN, GB] -> the 4 dense columns of each group
    half: tl.constexpr = tl.int32 if dt == tl.float32 else tl.int16  # an element's bits
    v0, v1 = w.to(half).to(dt, bitcast=True), (w >> dt.primitive_bitwidth).to(half).to(dt, bitcast=True)
    i0, i1 = c & 3, (c >> 2) & 3
    return (tl.where(i0 == 0, v0, 0.), tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, 0.)),
            tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, 0.)), tl.where(i1 == 3, v1, 0.))
@triton.jit
def gemv24_kernel(x_ptr, v_ptr, m_ptr, y_ptr, D, G, BN: tl.constexpr, GB: tl.constexpr):
    # M = 1, fp16/bf16, on CUDA cores: a program computes y[BN rows] over [BN, GB] tiles of groups
    rn = tl.program_id(0) * BN + tl.arange(0, BN)[:, None]          # [BN, 1]
    acc = tl.zeros((BN, GB), tl.float32)
    for g0 in range(0, G, GB):
        g = g0 + tl.arange(0, GB)[None, :] + 0 * rn                 # [BN, GB]: x loads at the tile's shape too
        w, c = load24(v_ptr, m_ptr, rn, g, D, G)
        x = tl.load(x_ptr + g, mask=g < G, other=0)                  # x0..x3 of a group: one 64-bit word
        lo, hi = x.to(tl.int32), (x >> 32).to(tl.int32)
        # the kept activations: code bit 1 (3) picks the 32-bit half holding x_i0 (x_i1), bit 0 (2) its 16-bit half
        xa = tl.where((c & 2) != 0, hi, lo) >> ((c << 4) & 16)
        xb = tl.where((c & 8) != 0, hi, lo) >> ((c << 2) & 16)
        acc += as_fp32(w, y_ptr.dtype.element_ty) * as_fp32(xa, y_ptr.dtype.element_ty)
        acc += as_fp32(w >> 16, y_ptr.dtype.element_ty) * as_fp32(xb, y_ptr.dtype.element_ty)
    tl.store(y_ptr + rn, tl.sum(acc, 1)[:, None].to(y_ptr.dtype.element_ty), mask=rn < D)
@triton.jit
def mma24_kernel(x_ptr, v_ptr, m_ptr, y_ptr, M, D, G, BM: tl.constexpr, BN: tl.constexpr, GB: tl.constexpr):
    # M <= 16 on tensor cores, operands swapped: y^T[BN, BM] += W[BN, 4 GB] x^T[4 GB, BM]; K split over program_id(1)
    rm, rn = tl.arange(0, BM)[None, :], tl.program_id(0) * BN + tl.arange(0, BN)[:, None]
    acc = tl.zeros((BN, BM), tl.float32)
    for g0 in range(tl.program_id(1) * GB, G, GB * tl.num_programs(1)):
        g = g0 + tl.arange(0, GB)
        w4 = dense24(*load24(v_ptr, m_ptr, rn, g[None, :], D, G), x_ptr.dtype.element_ty)
        for p in tl.static_range(4):  # K = position p of every group: W's columns 4g + p meet x's
            x = tl.load(x_ptr + rm * 4 * G + 4 * g[:, None] + p, mask=(rm < M) & (g[:, None] < G), other=0.)
            acc = tl.dot(w4[p], x, acc)
    tl.atomic_add(y_ptr + rm * D + rn, acc, mask=(rm < M) & (rn < D))  # fp32 y: the K splits add up
@triton.jit
def block16_kernel(x_ptr, t_ptr, c_ptr, y_ptr, M, D, C, NT, BM: tl.constexpr, T: tl.constexpr):
    # M <= 16: a program computes y^T[16 rows of a band, BM] += W[16, 16 T] x^T[16 T, BM], T tiles a step
    band, rm, r, k = tl.program_id(0), tl.arange(0, BM)[None, :], tl.arange(0, 16)[:, None], tl.arange(0, 16 * T)
    acc = tl.zeros((16, BM), tl.float32)
    for t0 in range(0, NT, T):
        t = t0 + k // 16                                             # the tile of each of the 16 T columns
        col = tl.load(c_ptr + band * NT + t, mask=t < NT, other=0)
        w = tl.load(t_ptr + ((band * NT + t[None, :]) * 16 + r) * 16 + k[None, :] % 16, mask=t[None, :] < NT, other=0.)
        x = tl.load(x_ptr + rm * C + (col * 16 + k % 16)[:, None], mask=(t[:, None] < NT) & (rm < M), other=0.)
        acc = tl.dot(w, x, acc)
    tl.store(y_ptr + rm * D + band * 16 + r, acc.to(y_ptr.dtype.element_ty), mask=rm < M)

# -------------------------------------------------- launches (bench/kernel_speed.py counts these configurations)
DECODE = 16  # tokens up to which our kernels run; prefill (compute-bound): cuBLAS over a dense scratch copy of W
GEMV24 = dict(BN=8, GB=256, num_warps=4)
MMA24 = dict(BM=16, BN=64, GB=64, num_warps=4, num_stages=1)  # plain loads: cp.async staging costs instructions
BLOCK16 = dict(BM=16, T=16, num_warps=4, num_stages=3)
def decode24(x, vals, meta):  # x [M, C] -> y [M, D]
    (M, C), D, words = x.shape, len(vals), vals.view(torch.int32 if vals.element_size() == 2 else torch.int64)
    if M > 1 or x.element_size() == 4:  # tensor cores; K split to about 2 programs an H100 SM (132), summed in fp32
        y, programs = torch.zeros(M, D, device=x.device), triton.cdiv(D, 64)
        mma24_kernel[(programs, triton.cdiv(264, programs))](x, words, meta, y, M, D, C // 4, **MMA24)
        return y.to(x.dtype)
    y = x.new_empty(M, D)  # M = 1, fp16/bf16: a GEMV on CUDA cores
    gemv24_kernel[(triton.cdiv(D, 8),)](x.view(torch.int64), words, meta, y, D, C // 4, **GEMV24)
    return y
def decode_block16(x, tiles, col):  # x [M <= 16, C] -> y [M, D]
    y = x.new_empty(len(x), 16 * len(tiles))
    block16_kernel[(len(tiles),)](x, tiles, col, y, len(x), y.shape[1], x.shape[1], col.shape[1], **BLOCK16)
    return y

# ------------------------------------------------------------------------------------------------------- module swap
@functools.cache
def compiled(twin):  # the prefill's W on a GPU: the twin fused into one pass (compiled on first use: it takes seconds)
    return torch.compile(twin, dynamic=True)
FORMATS = {'2:4': (('vals', 'meta'), pack24, unpack24, decode24),  # buffers, pack, the twin (W [D, C]), decode
           'block16': (('tiles', 'col'), pack_block16, unpack_block16, decode_block16)}
class PackedLinear(nn.Module):  # a drop-in nn.Linear holding only the packed weight, in FORMATS' buffers
    def __init__(self, linear, pattern):
        super().__init__()
        self.names, pack, self.unpack, self.decode = FORMATS[pattern]
        for name, t in zip(self.names, pack(linear.weight.detach())):
            self.register_buffer(name, t)
        self.register_buffer('bias', None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x):
        packed = [getattr(self, n) for n in self.names]
        if not (x.is_cuda or INTERPRET) or x.shape[:-1].numel() > DECODE:  # CPU: the twin; prefill: cuBLAS, dense W
            return F.linear(x, (compiled(self.unpack) if x.is_cuda else self.unpack)(*packed), self.bias)
        y = self.decode(x.reshape(-1, x.shape[-1]).contiguous(), *packed).view(*x.shape[:-1], -1)  # [M, C] -> [M, D]
        return y if self.bias is None else y + self.bias

def pack_model(model, pattern):  # every nn.Linear but lm_head: ours (transformer.h), transformers' Llama (model.layers)
    for name, child in list(model.named_modules()):  # list: we swap while walking
        if isinstance(child, nn.Linear) and name.split('.')[-1] != 'lm_head':
            model.set_submodule(name, PackedLinear(child, pattern))
    return model

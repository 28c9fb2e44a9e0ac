"""
The 2:4 Triton kernel compiled for sm_80 and sm_90 without a GPU (registers, spills, shared memory per launch
configuration, from the cubin); then, on a CUDA GPU, sparse matmul kernels vs dense cuBLAS on LLaMA-7B Linear shapes
in fp16 and bf16 (sm80+ for cuSPARSELt), and batch-1 decode of a LLaMA-7B-shaped model. Times are GPU-only: each op
runs inside a CUDA graph (as a compiled decode loop would, no Python launch overhead) over enough weight copies that
nothing is served from L2 (as in a real model's layers).

    python bench/kernel_speed.py
"""
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: sparse_kernels.py
import sparse_kernels as sk
from eval import generate

SHARED_LIMIT = {80: 166_912, 90: 232_448}  # bytes of shared memory one block may use: A100 163 KB, H100 227 KB
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')

def compiled(cc, dtype, blocks):
    """The 2:4 kernel compiled for sm_<cc> as matmul24 launches it, with Triton's bundled ptxas, no GPU needed:
    (registers per thread, spilled bytes per thread, shared memory bytes per block), read from the cubin."""
    t = {torch.float16: 'fp16', torch.bfloat16: 'bf16', torch.float32: 'fp32'}[dtype]
    sig = dict(x_ptr=f'*{t}', v_ptr=f'*{t}', m_ptr='*u8', y_ptr=f'*{t}', M='i32', D='i32', C='i32', CM='i32',
               PREC='constexpr', BM='constexpr', BN='constexpr', BK='constexpr')
    consts = dict(PREC='ieee' if t == 'fp32' else 'tf32', BM=blocks[0], BN=blocks[1], BK=blocks[2])
    fn = triton.JITFunction(sk._matmul24_kernel.fn)  # the plain function: also when TRITON_INTERPRET=1 wrapped it
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget('cuda', cc, 32))
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, 'k.cubin'), 'wb') as f:
            f.write(k.asm['cubin'])
        out = subprocess.run([CUOBJDUMP, '-res-usage', f.name], capture_output=True, text=True, check=True).stdout
    use = {key: int(v) for key, v in re.findall(r'(\w+):(\d+)', out)}  # REG, STACK, SHARED (static), LOCAL, ...
    return use['REG'], use['LOCAL'] + use['STACK'], k.metadata.shared + use['SHARED']

def compile_report():
    print('2:4 kernel compiled without a GPU (Triton {}): registers / spilled bytes per thread, shared memory per block'
          .format(triton.__version__))
    for cc in SHARED_LIMIT:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for name, blocks in (('decode', sk.DECODE), ('prefill', sk.PREFILL)):
                regs, spilled, shared = compiled(cc, dtype, blocks)
                print(f'  sm_{cc} {str(dtype)[6:]:8} {name:7} BM,BN,BK={blocks}: {regs:3d} registers, {spilled} bytes '
                      f'spilled, {shared:,} bytes shared (limit {SHARED_LIMIT[cc]:,})')

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (D, C) = (out, in): attention / MLP up, gate / MLP down
MS = [1, 4, 16, 64, 512, 4096]                         # tokens per matmul: decode batch ... prefill
L2_BYTES = 256 * 2**20                                 # weight copies cycled per graph, > 4x an H100's 50 MB L2

def time_us(fn, args, reps=20):
    # mean us per call of fn(*a) over a CUDA graph that calls it once for every a in args
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warmup off the capture: Triton compiles, cuSPARSELt plans
        for a in args:
            fn(*a)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for a in args:
            fn(*a)
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(args))

def bandwidth():
    # GB/s of a 1 GiB device-to-device copy (reads + writes 1 GiB each), the roofline for memory-bound decode
    src = torch.empty(2**30, dtype=torch.uint8, device='cuda')
    dst = torch.empty_like(src)
    return 2 * src.numel() / time_us(lambda: dst.copy_(src), [()], reps=10) / 1e3

def sparse_weights(D, C, dtype):
    # a 2:4 weight (2 largest of every 4) and a block16 one (half the 16x16 tiles of every 16-row band)
    w = torch.randn(D, C, device='cuda', dtype=dtype)
    g, i = w.view(D, C // 4, 4), w.view(D, C // 4, 4).abs().topk(2, -1).indices
    w24 = torch.zeros_like(g).scatter(-1, i, g.gather(-1, i))
    keep = torch.rand(D // 16, C // 16, device='cuda').argsort(1) < C // 32
    return w24.view(D, C), w * keep.repeat_interleave(16, 0).repeat_interleave(16, 1)

def check(dtype):
    # the kernels must agree with dense before any timing means anything
    w24, w16 = sparse_weights(4096, 4096, dtype)
    for M in (1, 64):
        x = torch.randn(M, 4096, device='cuda', dtype=dtype)
        for w, y in ((w24, sk.matmul24(x, *sk.pack24(w24))),
                     (w16, sk.matmul_block16(x, *sk.pack_block16(w16)))):
            ref = x.float() @ w.float().T
            err = ((y.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, f"kernel disagrees with dense: rel err {err:.2e} at M={M} {dtype}"

NA = set()  # reasons cuSPARSELt could not run, each printed once

def cusparselt_us(x, dense):
    # cuSPARSELt through PyTorch's semi-structured tensor; None where this GPU/shape/dtype has no support
    try:
        ws = [torch.sparse.to_sparse_semi_structured(w) for w in dense]
        return time_us(lambda w: F.linear(x, w), [(w,) for w in ws])
    except RuntimeError as e:
        why = str(e).splitlines()[0][:120]
        if why not in NA:
            print(f"  cuSPARSELt n/a: {why}")
        NA.add(why)

def bench_matmuls():
    bw = bandwidth()
    print(f"{torch.cuda.get_device_name()}: measured copy bandwidth {bw:.0f} GB/s; x = speedup vs dense, "
          f"% = achieved (weight + x + y bytes) / time against that bandwidth")
    for dtype in (torch.float16, torch.bfloat16):
        check(dtype)
        e = torch.finfo(dtype).bits // 8
        print(f"\n{dtype}\n{'D':>6} {'C':>6} {'M':>5} | {'dense us':>8} {'%':>4} | {'2:4 us':>8} {'x':>5} {'%':>4} | "
              f"{'cuSPLt us':>9} {'x':>5} | {'blk16 us':>8} {'x':>5} {'%':>4}")
        for D, C in SHAPES:
            w24, w16 = sparse_weights(D, C, dtype)
            n = math.ceil(L2_BYTES / (D * C * e))  # weight copies per graph
            dense = [w24.clone() for _ in range(n)]
            p24 = [sk.pack24(w) for w in dense]
            p16 = [sk.pack_block16(w16.clone()) for _ in range(n)]
            for M in MS:
                x = torch.randn(M, C, device='cuda', dtype=dtype)
                io = (M * C + M * D) * e  # activation bytes in and out
                pct = lambda nbytes, us: 100 * (nbytes + io) / us / 1e3 / bw
                t_d = time_us(lambda w: x @ w.T, [(w,) for w in dense])
                t_24 = time_us(lambda v, m: sk.matmul24(x, v, m), p24)
                t_cs = cusparselt_us(x, dense)
                t_16 = time_us(lambda *t: sk.matmul_block16(x, *t), p16)
                b24 = p24[0][0].numel() * e + p24[0][1].numel()
                b16 = sum(t.nbytes for t in p16[0])  # the tiles and their int64 indices
                cs = f"{t_cs:9.1f} {t_d / t_cs:5.2f}" if t_cs else f"{'n/a':>9} {'':>5}"
                print(f"{D:6d} {C:6d} {M:5d} | {t_d:8.1f} {pct(D * C * e, t_d):4.0f} | {t_24:8.1f} {t_d / t_24:5.2f} "
                      f"{pct(b24, t_24):4.0f} | {cs} | {t_16:8.1f} {t_d / t_16:5.2f} {pct(b16, t_16):4.0f}")
            del dense, p24, p16

def bench_decode(n_layer=32, new_tokens=128, dtype=torch.float16):
    """End-to-end greedy decode at batch 1 with a KV cache: LLaMA-7B-shaped model with random weights,
    dense vs every decoder Linear packed 2:4 (magnitude pattern). Prints tokens/s and decoder weight memory."""
    from model import GPT, GPTConfig
    import mask
    cfg = GPTConfig('llama', block_size=1024, vocab_size=32000, n_layer=n_layer, n_head=32, n_kv_head=32, n_embd=4096,
                    head_dim=128, n_inner=11008, qkv_bias=False, o_bias=False, mlp_bias=False, tie=False)
    with torch.device('cuda'):
        model = GPT(cfg).to(dtype).eval()
    for mod in model.transformer.h.modules():  # a finalised 2:4 model: exact zeros in every decoder Linear
        if isinstance(mod, torch.nn.Linear):
            mod.weight.data.masked_fill_(mask.project(mod.weight.detach().float().abs(), '2:4') == 0, 0.0)
    idx = torch.randint(0, 32000, (1, 16), device='cuda')
    print(f"\nend-to-end decode, batch 1, {n_layer} LLaMA-7B layers, {new_tokens} new tokens, {dtype}")
    for name in ('dense', '2:4'):
        if name == '2:4':
            sk.pack_model(model, '2:4')
        nbytes = sum(t.numel() * t.element_size() for t in list(model.transformer.h.parameters())
                     + list(model.transformer.h.buffers()))
        generate(model, idx, new_tokens)  # warmup at the timed length: Triton compiles, cuBLAS picks its kernels
        torch.cuda.synchronize()
        t0 = time.time()
        out = generate(model, idx, new_tokens)
        torch.cuda.synchronize()
        dt = time.time() - t0
        print(f"{name:6s} {new_tokens / dt:8.1f} tokens/s   decoder weights {nbytes / 2**30:6.2f} GiB")
        if name == 'dense':
            ref = out
    print(f"greedy tokens equal to dense: {(out == ref).float().mean().item():.2%}")

def main():
    compile_report()
    if not torch.cuda.is_available():
        sys.exit('no CUDA GPU here: the timings need one (on CPU: python -m pytest tests/test_kernels.py)')
    torch.manual_seed(0)
    bench_matmuls()
    bench_decode()

if __name__ == '__main__':
    main()

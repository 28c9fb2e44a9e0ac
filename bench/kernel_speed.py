"""
Sparse matmul kernels vs dense cuBLAS on LLaMA-7B Linear shapes, fp16 and bf16. Needs a CUDA GPU (sm80+ for
cuSPARSELt). Times are GPU-only: each op runs inside a CUDA graph (as a compiled decode loop would, no Python
launch overhead) over enough weight copies that nothing is served from L2 (as in a real model's layers).

    python bench/kernel_speed.py
"""
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: sparse_kernels.py
import sparse_kernels as sk

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
                t_16 = time_us(lambda t, c: sk.matmul_block16(x, t, c), p16)
                b24 = p24[0][0].numel() * e + p24[0][1].numel()
                b16 = p16[0][0].numel() * e + p16[0][1].numel() * 4
                cs = f"{t_cs:9.1f} {t_d / t_cs:5.2f}" if t_cs else f"{'n/a':>9} {'':>5}"
                print(f"{D:6d} {C:6d} {M:5d} | {t_d:8.1f} {pct(D * C * e, t_d):4.0f} | {t_24:8.1f} {t_d / t_24:5.2f} "
                      f"{pct(b24, t_24):4.0f} | {cs} | {t_16:8.1f} {t_d / t_16:5.2f} {pct(b16, t_16):4.0f}")
            del dense, p24, p16

@torch.no_grad()
def generate(model, idx, new_tokens):
    # greedy decoding with model.forward's KV cache: one prefill of idx (B, T), then one token a step
    c = model.config
    cache = [[model.lm_head.weight.new_zeros(idx.size(0), c.n_kv_head, idx.size(1) + new_tokens, c.head_dim)
              for _ in 'kv'] for _ in range(c.n_layer)]
    logits, _ = model(idx, cache=cache)
    for _ in range(new_tokens):
        idx = torch.cat((idx, logits[:, -1:].argmax(-1)), dim=1)
        logits, _ = model(idx[:, -1:], cache=cache, pos=idx.size(1) - 1)
    return idx

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
        generate(model, idx, 8)  # warmup: Triton compiles
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
    if not torch.cuda.is_available():
        sys.exit("bench/kernel_speed.py times CUDA kernels and needs a CUDA GPU; on CPU run: python -m pytest tests/test_kernels.py")
    torch.manual_seed(0)
    bench_matmuls()
    bench_decode()

if __name__ == '__main__':
    main()

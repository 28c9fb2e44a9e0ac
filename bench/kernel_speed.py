"""
The decode kernels of sparse_kernels.py compiled for sm_80 and sm_90 without a GPU, as the JIT launches them
(divisibility attributes included): the main loop's warp-instructions per kept weight, registers and spills, from
the cubin and its SASS (Triton's bundled ptxas and cuobjdump). Then, on a CUDA GPU: packed 2:4 and block16 Linears vs
dense cuBLAS and torch's to_sparse_semi_structured on LLaMA-7B shapes in fp16 and bf16, each op inside a CUDA graph
over enough weight copies that nothing is served from L2; and batch-1 greedy decode tokens/s of a LLaMA-7B-shaped
transformers model with random weights, dense vs packed 2:4. About 5 minutes on an H100.

    python bench/kernel_speed.py           # --loop also prints each main loop's instruction mix
"""
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: sparse_kernels.py
import sparse_kernels as sk

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')
# the budget: main-loop warp-instructions per kept weight on sm_90 (memory-bound decode needs about 0.3)
BUDGET = {('2:4', 1): 0.36, ('2:4', 16): 0.5, ('block16', 1): 0.15, ('block16', 16): 0.15}
D, G, C = 4096, 1024, 4096  # a LLaMA-7B layer: every pointer 16-byte aligned, every size a multiple of 16

def launch(kind, M, dtype):
    """(kernel, signature, constexprs, launch options, kept weights per main-loop iteration) as sparse_kernels runs
    `kind` for M tokens; the JIT marks M = 1 a constant and multiples of 16 divisible, as it does at run time."""
    t = {torch.float16: 'fp16', torch.bfloat16: 'bf16'}[dtype]
    if kind == '2:4' and M == 1:
        kernel, cfg = sk.gemv24_kernel, sk.GEMV24
        sig = dict(x_ptr='*i64', v_ptr='*i32', m_ptr='*i32', y_ptr=f'*{t}', D='i32', G='i32')
    elif kind == '2:4':
        kernel, cfg = sk.mma24_kernel, sk.MMA24
        sig = dict(x_ptr=f'*{t}', v_ptr='*i32', m_ptr='*i32', y_ptr='*fp32', M='i32', D='i32', G='i32')
    else:
        kernel, cfg = sk.block16_kernel, sk.BLOCK16
        sig = dict(x_ptr=f'*{t}', t_ptr=f'*{t}', c_ptr='*i32', y_ptr=f'*{t}', M='i32', D='i32', C='i32', NT='i32')
    consts = {k: v for k, v in cfg.items() if not k.startswith('num_')}
    if 'M' in sig and M == 1:
        consts['M'] = 1
    kept = cfg['T'] * 256 if kind == 'block16' else cfg['BN'] * cfg['GB'] * 2
    opts = dict(num_warps=cfg['num_warps'], num_stages=cfg.get('num_stages', 3))
    return kernel, sig, consts, opts, kept

def sass(cubin, flag):
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([CUOBJDUMP, flag, f.name], capture_output=True, text=True, check=True).stdout

def compiled(kind, M, cc, dtype):
    """Compile for sm_<cc> with no GPU: (warp-instructions per kept weight in the main loop, registers, spilled bytes,
    the loop's instruction mix). The main loop is the longest backward branch in the SASS."""
    kernel, sig, consts, opts, kept = launch(kind, M, dtype)
    fn = triton.JITFunction(kernel.fn) if sk.INTERPRET else kernel  # the plain function under TRITON_INTERPRET=1
    names = list(fn.arg_names)
    attrs = {(names.index(a),): [['tt.divisibility', 16]] for a, ty in sig.items()
             if ty.startswith('*') or a in ('D', 'G', 'C') or (a == 'M' and M % 16 == 0)}
    sig = sig | {k: 'constexpr' for k in consts}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget('cuda', cc, 32), options=opts)
    use = {key: int(v) for key, v in re.findall(r'(\w+):(\d+)', sass(k.asm['cubin'], '-res-usage'))}
    code = sass(k.asm['cubin'], '-sass')
    ins = [(int(a, 16), txt.strip()) for a, txt in re.findall(r'/\*([0-9a-f]{4,})\*/\s+(.*?);', code)]
    loops = [(int(b.group(1), 16), a) for a, txt in ins if 'BRA' in txt
             for b in [re.search(r'0x([0-9a-f]+)', txt)] if b and int(b.group(1), 16) < a]
    lo, hi = max(loops, key=lambda t: t[1] - t[0])
    ops = Counter(re.sub(r'^@!?U?P\w+\s+', '', txt).split()[0] for a, txt in ins if lo <= a <= hi)
    per_kept = sum(ops.values()) * opts['num_warps'] / kept
    return per_kept, use['REG'], use.get('LOCAL', 0) + use.get('STACK', 0), ops

def compile_report(loop=False):
    print(f'main loops compiled without a GPU (Triton {triton.__version__}); sm_90 budget: '
          + ', '.join(f'{kind} M={M} {b}' for (kind, M), b in BUDGET.items()))
    for kind, M in BUDGET:
        for cc in (80, 90):
            for dtype in (torch.float16, torch.bfloat16):
                per_kept, regs, spilled, ops = compiled(kind, M, cc, dtype)
                print(f'{kind} M={M} sm_{cc} {str(dtype)[6:]}: {per_kept:.2f} warp-instructions per kept weight, '
                      f'{regs} registers, {spilled} bytes spilled')
                if loop:
                    print('    loop: ' + ', '.join(f'{op} {n}' for op, n in ops.most_common()))

# ------------------------------------------------------------------------------------------------------ on a GPU
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (D, C) = (out, in): attention / MLP up, gate / MLP down
MS = [1, 4, 16, 64, 512, 4096]                         # tokens per matmul: decode batch ... prefill
L2_BYTES = 256 * 2**20                                 # weight bytes cycled per graph, > 4x an H100's 50 MB L2

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

def prune(w, pattern):
    # the largest-magnitude pattern: 2 of every 4 along C, or half the 16x16 tiles of every 16-row band
    if pattern == '2:4':
        g = w.view(len(w), -1, 4)
        return g.scatter(-1, g.abs().topk(2, -1, largest=False).indices, 0).view_as(w)
    tiles = w.view(len(w) // 16, 16, -1, 16).abs().sum((1, 3))        # [D/16, C/16]
    keep = torch.zeros_like(tiles, dtype=torch.bool).scatter(1, tiles.topk(tiles.shape[1] // 2, 1).indices, True)
    return w * keep.repeat_interleave(16, 0).repeat_interleave(16, 1)

def layer(w, pattern):
    # a packed Linear over the dense weight w [D, C]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device='meta')
    lin.weight = nn.Parameter(w, requires_grad=False)
    return sk.PackedLinear(lin, pattern)

def check(dtype):
    # the packed layers must agree with dense before any timing means anything (decode and prefill paths)
    for pattern in ('2:4', 'block16'):
        w = prune(torch.randn(4096, 4096, device='cuda', dtype=dtype), pattern)
        for M in (1, 4, 16, 64):
            x = torch.randn(M, 4096, device='cuda', dtype=dtype)
            ref = x.float() @ w.float().T
            err = ((layer(w, pattern)(x).float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, f"{pattern} disagrees with dense: rel err {err:.2e} at M={M} {dtype}"

def cusparselt_us(x, dense):
    # torch's semi-structured tensor (cuSPARSELt / CUTLASS); None where this GPU, shape or dtype has no support
    try:
        ws = [torch.sparse.to_sparse_semi_structured(w) for w in dense]
        return time_us(lambda w: F.linear(x, w), [(w,) for w in ws])
    except (RuntimeError, ValueError) as e:
        print(f"  to_sparse_semi_structured n/a: {str(e).splitlines()[0][:100]}")

def bench_matmuls():
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}: "
          f"us per matmul, x = dense time / this time")
    for dtype in (torch.float16, torch.bfloat16):
        check(dtype)
        print(f"\n{dtype}\n{'D':>6} {'C':>6} {'M':>5} | {'dense us':>8} | {'2:4 us':>8} {'x':>5} | "
              f"{'semi-str us':>11} {'x':>5} | {'blk16 us':>8} {'x':>5}")
        for D_, C_ in SHAPES:
            w = torch.randn(D_, C_, device='cuda', dtype=dtype)
            n = math.ceil(L2_BYTES / w.nbytes)  # weight copies per graph
            dense = [prune(w, '2:4') for _ in range(n)]
            p24 = [layer(d, '2:4') for d in dense]
            p16 = [layer(prune(w, 'block16'), 'block16') for _ in range(n)]
            for M in MS:
                x = torch.randn(M, C_, device='cuda', dtype=dtype)
                t_d = time_us(lambda w: F.linear(x, w), [(d,) for d in dense])
                t_24 = time_us(lambda l: l(x), [(l,) for l in p24])
                t_ss = cusparselt_us(x, dense)
                t_16 = time_us(lambda l: l(x), [(l,) for l in p16])
                ss = f"{t_ss:11.1f} {t_d / t_ss:5.2f}" if t_ss else f"{'n/a':>11} {'':>5}"
                print(f"{D_:6d} {C_:6d} {M:5d} | {t_d:8.1f} | {t_24:8.1f} {t_d / t_24:5.2f} | {ss} | "
                      f"{t_16:8.1f} {t_d / t_16:5.2f}")
            del dense, p24, p16

def bench_decode(n_layer=32, new_tokens=128, dtype=torch.float16):
    """Greedy decode at batch 1 with transformers' own KV cache: a LLaMA-7B-shaped LlamaForCausalLM with random
    weights pruned 2:4 by magnitude, dense vs pack_model(model, '2:4'). Tokens/s include transformers' Python
    overhead per token, the same for both."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=n_layer, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)
    with torch.device('cuda'):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name != 'lm_head':
                m.weight.copy_(prune(m.weight, '2:4'))
    idx = torch.randint(0, 32000, (1, 16), device='cuda')
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    print(f"\nend-to-end decode, batch 1, transformers LlamaForCausalLM, {n_layer} LLaMA-7B layers, "
          f"{new_tokens} new tokens, {dtype}")
    for name in ('dense', '2:4'):
        if name == '2:4':
            sk.pack_model(model, '2:4')
        nbytes = sum(t.nbytes for t in list(model.model.layers.parameters()) + list(model.model.layers.buffers()))
        model.generate(idx, **kw)  # warmup at the timed length: Triton compiles, cuBLAS picks its kernels
        torch.cuda.synchronize()
        t0 = time.time()
        out = model.generate(idx, **kw)
        torch.cuda.synchronize()
        print(f"{name:6s} {new_tokens / (time.time() - t0):8.1f} tokens/s   decoder weights {nbytes / 2**30:6.2f} GiB")
        ref = out if name == 'dense' else ref
    print(f"greedy tokens equal to dense: {(out == ref).float().mean().item():.2%}")

def main():
    compile_report(loop='--loop' in sys.argv)
    if not torch.cuda.is_available():
        sys.exit('no CUDA GPU here: the timings need one')
    torch.manual_seed(0)
    bench_matmuls()
    bench_decode()

if __name__ == '__main__':
    main()

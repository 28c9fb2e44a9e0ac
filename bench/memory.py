"""
Memory of train.py on CPU (gloo): every rank's peak resident memory over the whole run (/usr/bin/time's %M: load,
2 iterations, the checkpoint save), for one process, DDP on 2 ranks and FSDP on 2 and 4 ranks, with glibc's default
allocator and with a fixed mmap threshold; the bytes one sparse layer keeps for its backward against an nn.Linear;
and what one LLaMA-2-7B-shaped block keeps per token (the README's 7B table). Each run is `train.py` in a subprocess
(the embedded default, SmolLM2-135M with its KD teacher, from m = 1 as FSDP starts).

    python prepare.py pydoc --model=smollm2 && python bench/memory.py     # ~20 minutes on the 2-core CPU machine
    python bench/memory.py --extra="--batch_size=4 --block_size=256"      # the default batch: activations dominate
"""
import argparse, os, re, subprocess, sys, tempfile
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import mask as sf
from model import GPT, GPTConfig

p = argparse.ArgumentParser(description=__doc__.strip().split('\n')[0])
p.add_argument('--modes', default='1,ddp2,fsdp2,fsdp4', help='1 (one process), ddpN, fsdpN')
p.add_argument('--tokens', type=int, default=512, help='tokens through the LLaMA-2-7B-shaped block')
p.add_argument('--extra', default='--batch_size=1 --block_size=32', help='more train.py arguments, for every run')
a = p.parse_args()
# glibc keeps freed buffers below its adaptive mmap threshold in the heap, so a process's peak then counts the
# allocator's history too; a fixed threshold returns them, and the peak counts the tensors alive at once
ALLOCATORS = {'glibc default': {}, 'MALLOC_MMAP_THRESHOLD_=131072': {'MALLOC_MMAP_THRESHOLD_': '131072'}}
rows = []
for alloc, malloc_env in ALLOCATORS.items():
    for mode in a.modes.split(','):
        n = int(re.sub(r'\D', '', mode))
        launch = [] if n == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                    f'--nproc_per_node={n}', '--no-python']
        env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', **malloc_env}
        with tempfile.TemporaryDirectory() as out:
            args = ['--max_iters=2', '--eval_interval=0', '--eval_tokens=2048', '--log_interval=1',
                    '--mask_init=dense', f'--gradient_accumulation_steps={n}', f'--out_dir={out}']
            args += ['--fsdp=True'] * mode.startswith('fsdp') + a.extra.split()
            timed = ['/usr/bin/time', '-f', 'peak resident %M kB', sys.executable, os.path.join(ROOT, 'train.py')]
            r = subprocess.run(launch + timed + args, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f'{mode} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}')
        peaks = [int(kb) / 2**20 for kb in re.findall(r'peak resident (\d+) kB', r.stderr)]  # GB, one per rank
        assert len(peaks) == n, f'{mode}: {len(peaks)} of {n} ranks reported their memory'
        losses = ' '.join(re.findall(r'^iter \d+: loss (\S+)', r.stdout, re.M))
        rows.append((alloc, mode, peaks, losses))
        print(f'{alloc}, {mode}: peak GB per rank ' + ' '.join(f'{g:.2f}' for g in peaks) + f'; losses {losses}',
              flush=True)
print(f'\n{"allocator":<31}{"mode":<7}{"ranks":>6}{"peak GB":>9}{"x one":>7}   losses  (the rank with the most)')
for alloc, mode, peaks, losses in rows:
    one = max(next(p for al, m, p, _ in rows if al == alloc and m == '1'))
    print(f'{alloc:<31}{mode:<7}{len(peaks):>6}{max(peaks):>9.2f}{max(peaks) / one:>7.2f}   {losses}')

def saved_bytes(f, module, x):
    """Bytes that f(x) keeps for the backward beyond module's own parameters and buffers (alive anyway)."""
    own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        f(x)
    kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}  # a storage saved twice: once
    return sum(n for ptr, n in kept.items() if ptr not in own)

D, C = 3072, 576  # SmolLM2's fused gate/up projection
x = torch.randn(4, 256, C, requires_grad=True)
lin = nn.Linear(C, D, bias=False)
l = sf.SparseLinear(lin, '2:4')
l.mask.uniform_()
l.x.fill_(0.5)  # mid-quench
product = lambda x: F.linear(x, l.weight * l.proj.lerp(l.mask, l.x))  # before: W * m_eff a tensor of its own
print(f'\nbytes kept for the backward, {D}x{C} weight, x {tuple(x.shape)} fp32: nn.Linear {saved_bytes(lin, lin, x):,}, '
      f'W * m_eff then F.linear (before) {saved_bytes(product, l, x):,}, SparseLinear {saved_bytes(l, l, x):,}')

# one LLaMA-2-7B-shaped block (d 4096, 32 heads, SwiGLU 11008), masked, under bf16 autocast as on the GPU: what its
# forward keeps for the backward per token; the activations of config/llama2_7b.py are this x 4096 tokens x 32 blocks
cfg = GPTConfig(arch='llama', block_size=4096, vocab_size=256, n_layer=1, n_head=32, n_kv_head=32, n_embd=4096,
                head_dim=128, n_inner=11008, qkv_bias=False, o_bias=False, mlp_bias=False, tie=False)
model = GPT(cfg)
layers = sf.sparsify(model, '2:4', score='wanda')
for l in layers:
    l.mask.uniform_()
    l.x.fill_(0.5)
block = model.transformer.h[0]
x, rope = model.embed(torch.zeros(1, a.tokens, dtype=torch.long))
x.requires_grad_(True)
with torch.autocast('cpu', dtype=torch.bfloat16):
    kept = saved_bytes(lambda x: block(x, rope), block, x)
wm = sum(l.weight.numel() for l in layers) * 2  # bytes of the bf16 W * m_eff that F.linear(x, W * m_eff) would keep
print(f'LLaMA-2-7B-shaped block, {a.tokens} tokens, bf16 autocast: {kept / a.tokens / 2**10:.1f} KiB kept per token '
      f'({kept * 4096 / a.tokens * 32 / 2**30:.1f} GiB for 4096 tokens x 32 blocks); W * m_eff would add '
      f'{wm / 2**30:.2f} GiB a block ({wm * 32 / 2**30:.1f} GiB for 32)')

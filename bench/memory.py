"""
Memory of train.py on CPU (gloo): the peak resident memory (VmHWM) of every rank, loaded / trained / with the save,
for one process, DDP on 2 ranks and FSDP on 2 and 4 ranks, each for 2 iterations of the embedded default
(SmolLM2-135M, KD teacher, wanda score, m = 1); the bytes one sparse layer keeps for its backward against an nn.Linear;
and what one LLaMA-2-7B-shaped block keeps per token (the README's 7B table). A thin driver like bench/tokens.py:
each run is `train.py` in a subprocess whose ranks report their own VmHWM.

    python prepare.py pydoc --model=smollm2 && python bench/memory.py     # ~20 minutes on the 2-core CPU machine
    python bench/memory.py --extra="--batch_size=1 --block_size=32"       # almost no activations: the state
    python bench/memory.py --train=../old/train.py --extra=--baselines=False   # another version (a0a38dd: before)
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
p.add_argument('--train', default=os.path.join(ROOT, 'train.py'), help='the train.py to measure')
p.add_argument('--modes', default='1,ddp2,fsdp2,fsdp4', help='1 (one process), ddpN, fsdpN')
p.add_argument('--tokens', type=int, default=512, help='tokens through the LLaMA-2-7B-shaped block')
p.add_argument('--extra', default='', help='more train.py --key=value arguments, given to every run')
a = p.parse_args()
# every rank prints its peak resident memory (VmHWM from /proc/self/status) three times: when train.py builds its
# optimizer (the model loaded, and sharded under FSDP), when it first gathers a checkpoint (trained), and at exit
WRAP = ("import atexit, os, runpy, sys, torch, torch.distributed.checkpoint.state_dict as dcp\n"
        "hwm, peak = lambda: open('/proc/self/status').read().split('VmHWM:')[1].split()[0], []\n"
        "init, get = torch.optim.AdamW.__init__, dcp.get_state_dict\n"
        "torch.optim.AdamW.__init__ = lambda *a, **k: peak.append(hwm()) or init(*a, **k)\n"
        "dcp.get_state_dict = lambda *a, **k: peak.append(hwm()) or get(*a, **k)\n"
        "line = lambda: f'\\nVmHWM rank {os.environ.get(\"RANK\", 0)}: {peak[0]} {peak[1]} {hwm()} kB\\n'.encode()\n"
        "atexit.register(lambda: os.write(1, line()))  # one write: never split by another rank's output\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
# glibc keeps freed buffers below its (adaptive) mmap threshold in the heap: a fixed threshold makes VmHWM count the
# tensors alive at once, not the allocator's history (a GPU run keeps training tensors off the host anyway)
env = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'MALLOC_MMAP_THRESHOLD_': '131072', **os.environ}
rows = []
for mode in a.modes.split(','):
    n = int(re.sub(r'\D', '', mode))
    launch = [sys.executable] if n == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                              f'--nproc_per_node={n}', '--no-python', sys.executable]
    with tempfile.TemporaryDirectory() as out:
        args = ['--max_iters=2', '--eval_interval=0', '--eval_tokens=2048', '--log_interval=1',
                f'--gradient_accumulation_steps={n}', f'--out_dir={out}'] + ['--fsdp=True'] * mode.startswith('fsdp')
        has_init = 'mask_init =' in open(a.train).read()  # a0a38dd's train.py has no such key
        args += ['--mask_init=dense'] * has_init  # m = 1: FSDP's start
        args += a.extra.split()
        cwd = os.path.dirname(os.path.abspath(a.train))  # that train.py imports its own model.py and mask.py
        r = subprocess.run(launch + ['-c', WRAP, a.train] + args, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f'{mode} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}')
    found = sorted(re.findall(r'^VmHWM rank (\d+): (\d+) (\d+) (\d+) kB', r.stdout, re.M))
    assert len(found) == n, f'{mode}: {len(found)} of {n} ranks reported their memory'
    peaks = [[int(kb) / 2**20 for kb in kbs] for _, *kbs in found]  # GB per rank: loaded, trained, with the save
    losses = ' '.join(re.findall(r'^iter \d+: loss (\S+)', r.stdout, re.M))
    rows.append((mode, peaks, losses))
    print(f'{mode}: peak GB per rank (loaded / trained / with the save) '
          + ', '.join(' / '.join(f'{g:.2f}' for g in p) for p in peaks) + f'; losses {losses}', flush=True)
print(f'\n{"mode":<7}{"ranks":>6}' + ''.join(f'{h:>11}{"x one":>7}' for h in ('loaded', 'trained', 'saved'))
      + '   losses  (GB, the rank with the most)')
one = [max(p) for p in zip(*rows[0][1])]
for mode, peaks, losses in rows:
    top = [max(p) for p in zip(*peaks)]
    print(f'{mode:<7}{len(peaks):>6}' + ''.join(f'{t:>11.2f}{t / o:>7.2f}' for t, o in zip(top, one)) + f'   {losses}')

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
    kept = saved_bytes(lambda x: block(x, rope, None, 0), block, x)
wm = sum(l.weight.numel() for l in layers) * 2  # bytes of the bf16 W * m_eff that F.linear(x, W * m_eff) would keep
print(f'LLaMA-2-7B-shaped block, {a.tokens} tokens, bf16 autocast: {kept / a.tokens / 2**10:.1f} KiB kept per token '
      f'({kept * 4096 / a.tokens * 32 / 2**30:.1f} GiB for 4096 tokens x 32 blocks); W * m_eff would add '
      f'{wm / 2**30:.2f} GiB a block ({wm * 32 / 2**30:.1f} GiB for 32)')

"""
Memory of train.py on CPU (gloo): the peak resident memory (VmHWM) of every rank for one process, DDP on 2 ranks and
FSDP on 2 and 4 ranks, each for 2 iterations of the embedded default (SmolLM2-135M, 4 x 256 tokens a micro-batch,
the KD teacher, wanda score), and the bytes one sparse layer keeps for its backward against an nn.Linear.
A thin driver like bench/tokens.py: each run is `train.py` in a subprocess whose ranks report their own VmHWM.

    python prepare.py pydoc --model=smollm2 && python bench/memory.py      # ~15 minutes on the 2-core CPU machine
    python bench/memory.py --train=../other/train.py --extra=--baselines=False   # the same runs on another version
"""
import argparse, os, re, subprocess, sys, tempfile
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import mask as sf

p = argparse.ArgumentParser(description=__doc__.strip().split('\n')[0])
p.add_argument('--train', default=os.path.join(ROOT, 'train.py'), help='the train.py to measure')
p.add_argument('--modes', default='1,ddp2,fsdp2,fsdp4', help='1 (one process), ddpN, fsdpN')
p.add_argument('--extra', default='', help='more train.py --key=value arguments, given to every run')
a = p.parse_args()
# every rank prints its peak resident memory at exit: VmHWM from /proc/self/status, in kB
WRAP = ("import atexit, os, runpy, sys\n"
        "hwm = lambda: open('/proc/self/status').read().split('VmHWM:')[1].split()[0]\n"
        "atexit.register(lambda: print(f'VmHWM rank {os.environ.get(\"RANK\", 0)}: {hwm()} kB', flush=True))\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
env = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', **os.environ}
rows = []
for mode in a.modes.split(','):
    n = int(re.sub(r'\D', '', mode))
    launch = [sys.executable] if n == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                              f'--nproc_per_node={n}', '--no-python', sys.executable]
    with tempfile.TemporaryDirectory() as out:
        args = ['--max_iters=2', '--eval_interval=0', '--eval_tokens=2048', '--log_interval=1',
                f'--gradient_accumulation_steps={n}', f'--out_dir={out}'] + ['--fsdp=True'] * mode.startswith('fsdp')
        args += a.extra.split()
        r = subprocess.run(launch + ['-c', WRAP, a.train] + args, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f'{mode} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}')
    peaks = [int(kb) / 2**20 for _, kb in sorted(re.findall(r'^VmHWM rank (\d+): (\d+) kB', r.stdout, re.M))]
    losses = re.findall(r'^iter (\d+): loss (\S+)', r.stdout, re.M)
    rows.append((mode, peaks, ' '.join(x for _, x in losses), re.search(r'val ppl (\S+)$', r.stdout, re.M)[1]))
    print(f'{mode}: peak GB per rank {" ".join(f"{g:.2f}" for g in peaks)}, losses {rows[-1][2]}, ppl {rows[-1][3]}',
          flush=True)
print(f'\n{"mode":<8}{"ranks":>6}{"peak GB, max rank":>19}{"x one process":>15}   losses')
for mode, peaks, losses, _ in rows:
    print(f'{mode:<8}{len(peaks):>6}{max(peaks):>19.2f}{max(peaks) / max(rows[0][1]):>15.2f}   {losses}')

def saved_bytes(f, module, x):
    """Bytes that f(x) keeps for the backward beyond module's own parameters and buffers (alive anyway)."""
    own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        f(x)
    return sum(t.untyped_storage().nbytes() for t in saved if t.untyped_storage().data_ptr() not in own)

D, C = 3072, 576  # SmolLM2's fused gate/up projection
x = torch.randn(4, 256, C, requires_grad=True)
lin = nn.Linear(C, D, bias=False)
l = sf.SparseLinear(lin, '2:4')
l.mask.uniform_()
l.x.fill_(0.5)  # mid-quench
product = lambda x: F.linear(x, l.weight * l.proj.lerp(l.mask, l.x))  # before: W * m_eff a tensor of its own
print(f'\nbytes kept for the backward, {D}x{C} weight, x {tuple(x.shape)} fp32: nn.Linear {saved_bytes(lin, lin, x):,}, '
      f'W * m_eff then F.linear (before) {saved_bytes(product, l, x):,}, SparseLinear {saved_bytes(l, l, x):,}')

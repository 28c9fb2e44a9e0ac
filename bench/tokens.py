"""
Val perplexity and zero-shot accuracy against retraining tokens for every method train.py runs, at equal token
budgets: dense, the one-shot baselines (magnitude, Wanda, SparseGPT) and the same followed by KD fine-tuning under
their frozen mask (prune-then-fine-tune, the bar practitioners use), AST-style retraining, SparseForge from
SparseGPT's mask (the default) and from m = 1 (the paper's start) with each mask score (Fisher, Wanda's statistics,
magnitude), and KD fine-tuning of the dense model (--method=dense): the dense model that saw the same tokens (column
"x KD") and the baseline of SparseForge's ms/iter overhead. At the largest budget (at 0 tokens for the one-shot rows),
the --zero_shot methods' checkpoints also get `eval.py --tasks=paper`, the seven tasks. A thin driver: each row is one
`python train.py ...` run in the current directory (where data/ is), its output kept in
<out>/<method>_<iters>/log.txt. Prints one table and writes it to <out>/tokens.csv (with the per-task accuracies) and
<out>/tokens.png.

    python prepare.py pydoc --model=smollm2 && python bench/tokens.py   # embedded default, offline, CPU
    python bench/tokens.py --model=gpt2 --dataset=c4 --budgets=250,1000,4000 --batch_size=16 --block_size=1024

The default (SmolLM2-135M, pydoc, 16 and 64 iterations of 4 x 256 tokens, 64 being the README's budget) takes 4-5 hours
on the 2-core CPU machine, half of it zero-shot (README has the table). On a GPU train.py picks cuda and bf16 itself;
--extra passes anything else to every run (e.g. "--gradient_accumulation_steps=8").
"""
import argparse, csv, os, re, shlex, shutil, subprocess, sys, time
import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {  # name -> train.py arguments
    'dense': ['--method=dense', '--w_kl=0.0'],  # evaluated only (0 iterations), so no teacher
    'magnitude': ['--method=magnitude'],
    'wanda': ['--method=wanda'],
    'sparsegpt': ['--method=sparsegpt'],
    'ast': [os.path.join(ROOT, 'config', 'ast_smollm2.py')],  # it sets max_iters: it goes first, the overrides after
    'sparseforge': [],                                        # the default: soft mask from SparseGPT's, wanda score, KD
    'sf-dense': ['--mask_init=dense'],                        # the paper's start, m = 1; the scores compared from it
    'sf-hessian': ['--mask_init=dense', '--score=hessian'],   # OBD with the per-position Fisher diagonal
    'sf-magnitude': ['--mask_init=dense', '--score=magnitude'],
    'wanda-ft': ['--method=wanda'],                           # prune, then KD fine-tuning under the frozen mask
    'sparsegpt-ft': ['--method=sparsegpt'],
    'kd-dense': ['--method=dense'],                           # KD fine-tuning without a mask: the overhead baseline
    'sf-no-kd': ['--w_kl=0.0'],                               # not in the default set: the paper's KD ablation
}
ONCE = ('dense', 'magnitude', 'wanda', 'sparsegpt')  # no retraining: run once, at 0 tokens (calibration not counted)
DEFAULT = [m for m in METHODS if m != 'sf-no-kd']
ZERO_SHOT = 'dense,magnitude,wanda,sparsegpt,ast,sparseforge,sparsegpt-ft,kd-dense'

p = argparse.ArgumentParser(description=__doc__.strip().split('\n')[0])
p.add_argument('--model', default='smollm2', help='train.py --init_from: HF name, local dir, .gguf or smollm2')
p.add_argument('--dataset', default='pydoc', help='data/<dataset>_<model>/ from prepare.py')
p.add_argument('--budgets', default='16,64', help='comma-separated retraining iterations')
p.add_argument('--methods', default=','.join(DEFAULT), help='comma-separated, from: ' + ', '.join(METHODS))
p.add_argument('--zero_shot', default=ZERO_SHOT, help='methods whose largest-budget model gets the seven tasks')
p.add_argument('--limit', default='', help='eval.py --limit for the zero-shot tasks (default: eval.py\'s)')
p.add_argument('--batch_size', type=int, default=4)
p.add_argument('--block_size', type=int, default=256, help='training sequence and evaluation window length')
p.add_argument('--out', default='out/bench')
p.add_argument('--extra', default='', help='more train.py --key=value arguments, given to every run')
a = p.parse_args()
budgets, methods = [int(b) for b in a.budgets.split(',')], a.methods.split(',')
if unknown := set(methods) - set(METHODS):
    sys.exit(f'unknown methods {sorted(unknown)}; the methods are {", ".join(METHODS)}')
methods = ['dense'] + [m for m in methods if m != 'dense']  # the ratio column needs it
common = [f'--init_from={a.model}', f'--dataset={a.dataset}', f'--batch_size={a.batch_size}',
          f'--block_size={a.block_size}', '--log_interval=1'] + shlex.split(a.extra)
# offline unless the caller's environment says otherwise: hub look-ups hang before failing here (README)
env = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', **os.environ}

def zero_shot(ckpt, log):
    """eval.py --tasks=paper on a checkpoint -> {task: acc, ..., 'mean_acc': the seven-task mean}."""
    cmd = [sys.executable, os.path.join(ROOT, 'eval.py'), ckpt, '--tasks=paper', f'--export={ckpt}.hf']
    r = subprocess.run(cmd + [f'--limit={a.limit}'] * bool(a.limit), env=env, capture_output=True, text=True)
    log.write(r.stdout + r.stderr)
    if r.returncode:
        sys.exit(f'zero-shot failed:\n  {shlex.join(cmd)}\n{r.stderr[-3000:]}')
    accs = {t: float(x) for t, x in re.findall(r': (\w+) acc ([\d.]+) \+-', r.stdout)}
    return accs | {'mean_acc': float(re.search(r'mean acc over 7 tasks ([\d.]+)', r.stdout)[1])}

def run(name, iters):
    """One train.py run -> a table row; val ppl evaluated once, at the end (eval_interval = iters)."""
    d = os.path.join(a.out, f'{name}_{iters}')
    cmd = [sys.executable, os.path.join(ROOT, 'train.py')] + METHODS[name] + common + [
        f'--max_iters={iters}', f'--eval_interval={max(1, iters)}', f'--out_dir={d}']
    if os.path.exists(os.path.join(d, 'ckpt.pt')):  # left by an interrupted bench: train.py would refuse to start
        os.remove(os.path.join(d, 'ckpt.pt'))
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, log = time.time() - t0, r.stdout + r.stderr
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, 'log.txt'), 'w').write(log)
    ppl = re.search(r'^final .*: val ppl ([\d.]+)$', r.stdout, re.M)
    if r.returncode or not ppl:
        sys.exit(f'{name} at {iters} iterations failed:\n  {shlex.join(cmd)}\n{log[-3000:]}')
    tokens_per_iter = int(re.search(r'tokens per iteration: ([\d,]+)', r.stdout)[1].replace(',', ''))
    ms = [float(m) for m in re.findall(r'^iter [1-9]\d*: loss .*?, (\d+)ms', r.stdout, re.M)]  # iter 0 warms up
    row = dict(method=name, iters=iters, tokens=iters * tokens_per_iter, val_ppl=float(ppl[1]), wall_s=round(wall, 1),
               ms_iter=round(sum(ms) / len(ms), 1) if ms else None)
    if name in a.zero_shot.split(',') and iters == (0 if name in ONCE else max(budgets)):
        with open(os.path.join(d, 'zero_shot.txt'), 'w') as log:
            row |= zero_shot(os.path.join(d, 'ckpt.pt'), log)
        shutil.rmtree(os.path.join(d, 'ckpt.pt.hf'))
    # the checkpoint holds weights, masks, their statistics and AdamW moments, ~3 GB for SmolLM2; the table needs none
    os.remove(os.path.join(d, 'ckpt.pt'))
    print(f'{name} {iters} iters: val ppl {row["val_ppl"]:.2f}' + (f', zero-shot mean acc {row["mean_acc"]:.4f}'
          if 'mean_acc' in row else '') + f', {wall:.0f}s', flush=True)
    return row

rows = [run(m, 0) for m in methods if m in ONCE] + [run(m, b) for b in budgets for m in methods if m not in ONCE]
at = {(r['method'], r['iters']): r for r in rows}
for r in rows:  # against the starting dense model, and against dense KD fine-tuning on the same tokens
    r['ratio'] = round(r['val_ppl'] / rows[0]['val_ppl'], 3)
    r['vs_kd'] = round(r['val_ppl'] / at[('kd-dense', r['iters'])]['val_ppl'], 3) if ('kd-dense', r['iters']) in at else None

cols = ['method', 'iters', 'tokens', 'val_ppl', 'ratio', 'vs_kd', 'mean_acc', 'wall_s', 'ms_iter']
cols += sorted({k for r in rows for k in r} - set(cols))  # the zero-shot accuracy of each task
fmt = '{:<16}{:>6}{:>9}{:>11}{:>9}{:>7}{:>10}{:>8}{:>9}'
print('\n' + fmt.format('method', 'iters', 'tokens', 'val ppl', 'x dense', 'x KD', 'zero-shot', 'wall s', 'ms/iter'))
for r in rows:
    print(fmt.format(r['method'], r['iters'], f'{r["tokens"]:,}', f'{r["val_ppl"]:,.2f}', f'{r["ratio"]:.2f}',
                     '-' if r['vs_kd'] is None else f'{r["vs_kd"]:.2f}',
                     f'{r["mean_acc"] * 100:.2f}' if 'mean_acc' in r else '', f'{r["wall_s"]:.0f}',
                     '-' if r['ms_iter'] is None else f'{r["ms_iter"]:.0f}'))
for b in budgets:  # the cost of the mask (scores, updates, projection) over the same KD step
    sf, kd = at.get(('sparseforge', b)), at.get(('kd-dense', b))
    if sf and kd and sf['ms_iter'] and kd['ms_iter']:
        print(f'overhead at {b} iters: sparseforge {sf["ms_iter"]:.0f} ms/iter vs KD {kd["ms_iter"]:.0f} ms/iter'
              f' = {sf["ms_iter"] / kd["ms_iter"]:.2f}x')
for b in budgets:  # the paper's thesis: a better mask needs fewer tokens than AST-style retraining
    sf, ast = at.get(('sparseforge', b)), at.get(('ast', 4 * b))
    if sf and ast:
        print(f'sparseforge at {b} iters: {sf["val_ppl"]:.2f} vs ast at {4 * b} iters: {ast["val_ppl"]:.2f}')

os.makedirs(a.out, exist_ok=True)
with open(os.path.join(a.out, 'tokens.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, cols)
    w.writeheader()
    w.writerows(rows)
plt.figure(figsize=(8, 5))
for i, m in enumerate(methods):
    pts = [(r['tokens'], r['val_ppl']) for r in rows if r['method'] == m]
    if m in ONCE:  # 0 tokens: a level to beat, not a point on a log axis
        plt.axhline(pts[0][1], color=plt.cm.tab20(i % 20), ls='--', lw=1, label=f'{m} (0 tokens)')
    else:
        plt.plot(*zip(*pts), color=plt.cm.tab20(i % 20), marker='o', label=m)
plt.xscale('log')
plt.yscale('log')
plt.xlabel('retraining tokens')
plt.ylabel('val perplexity')
plt.title(f'{a.model} on {a.dataset}, batch {a.batch_size} x {a.block_size}')
plt.legend(fontsize=8)
plt.grid(True, which='both', alpha=0.3)
plt.savefig(os.path.join(a.out, 'tokens.png'), dpi=120, bbox_inches='tight')
print(f'wrote {a.out}/tokens.csv and {a.out}/tokens.png')

"""
SparseForge against the baselines at equal token budgets, on three measures, over seeds: pydoc val perplexity (the
training domain), perplexity on general English never trained on (BoolQ's Wikipedia passages, prepare.py boolq), and
the seven-task zero-shot mean (lm-eval's group `sparseforge`, tasks/sparseforge.yaml). Every row is `python train.py
...` (then `python eval.py` on its checkpoint) in the current directory, where data/ is; a row's results are kept in
<out>/<method>_<iters>_s<seed>/row.json, so a bench that was stopped resumes where it was. Prints the rows and a summary
(mean +- sample std over seeds), writes <out>/tokens.csv and <out>/tokens.png (val and general perplexity against
retraining tokens).

    python prepare.py pydoc --model=smollm2 && python bench/boolq.py --model=smollm2 --tokens=65536
    python bench/tokens.py --methods=sparseforge,sparsegpt-ft --budgets=16,64 --seeds=1337,1,2   # the seed study
    python bench/tokens.py --methods=sf-dense,sparsegpt-ft --budgets=16,64,256 --batch_size=1 --zero_shot=  # a curve

Methods: dense and the one-shot baselines (magnitude, wanda, sparsegpt: bench/prune.py, calibrated on 32 sequences
drawn with the row's seed) run once, at 0 tokens; the same followed by KD fine-tuning under their frozen mask
(wanda-ft, sparsegpt-ft: train.py --mask_init=zeros on the pruned checkpoint, prune-then-fine-tune, the bar
practitioners use); SparseForge as shipped (sparseforge), from m = 1 (sf-dense, the paper's start) and with each score;
AST (config/ast_smollm2.py's method); KD fine-tuning of the dense model (kd-dense). On a GPU train.py picks cuda and
bf16 itself; --extra passes anything else to every train.py run.
"""
import argparse, csv, json, os, re, shlex, shutil, statistics, subprocess, sys, time
import matplotlib
matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {  # name -> train.py arguments
    'dense': ['--method=dense', '--w_kl=0.0'],  # evaluated only (0 iterations), so no teacher
    'magnitude': ['--mask_init=zeros'],                       # bench/prune.py's checkpoint, evaluated as it is
    'wanda': ['--mask_init=zeros'],
    'sparsegpt': ['--mask_init=zeros'],
    'sparseforge': [],                                        # the shipped default: m = 1, the Fisher score
    'sf-hessian': ['--mask_init=dense', '--score=hessian'],   # the same, spelled out (the rows of older defaults)
    'sf-dense': ['--mask_init=dense', '--score=wanda'],       # the paper's start, m = 1, with Wanda's statistics
    'sf-magnitude': ['--mask_init=dense', '--score=magnitude'],
    'wanda-ft': ['--mask_init=zeros'],                        # prune, then KD fine-tuning under the frozen mask
    'sparsegpt-ft': ['--mask_init=zeros'],
    'ast': ['--method=ast', '--score=magnitude', '--mask_interval=10', '--mask_start=0.0', '--srste_decay=30.0',
            '--srste_ramp=0.5'],                              # config/ast_smollm2.py's method
    'kd-dense': ['--method=dense'],                           # KD fine-tuning without a mask
}
PRUNED = {'magnitude': 'magnitude', 'wanda': 'wanda', 'sparsegpt': 'sparsegpt', 'wanda-ft': 'wanda',
          'sparsegpt-ft': 'sparsegpt'}  # method -> the bench/prune.py baseline it starts from
ONCE = ('dense', 'magnitude', 'wanda', 'sparsegpt')  # no retraining: run once, at 0 tokens (calibration not counted)

p = argparse.ArgumentParser(description=__doc__.strip().split('\n')[0])
p.add_argument('--model', default='smollm2', help='train.py --init_from: HF name, local dir, .gguf or smollm2')
p.add_argument('--dataset', default='pydoc', help='data/<dataset>_<model>/ from prepare.py: the training corpus')
p.add_argument('--general', default='boolq', help='data/<general>_<model>/test.bin (bench/boolq.py): never trained on')
p.add_argument('--budgets', default='16,64', help='comma-separated retraining iterations')
p.add_argument('--seeds', default='1337', help='comma-separated train.py --seed values (data order, calibration)')
p.add_argument('--methods', default='dense,sparsegpt,wanda,sparseforge,sf-dense,sf-hessian,sparsegpt-ft,wanda-ft',
               help='comma-separated, from: ' + ', '.join(METHODS))
p.add_argument('--zero_shot', default='64', help='budgets whose models get the seven tasks (0: the one-shot rows)')
p.add_argument('--limit', type=int, default=500, help="lm-eval's --limit: documents per zero-shot task")
p.add_argument('--batch_size', type=int, default=4)
p.add_argument('--block_size', type=int, default=256, help='training sequence and evaluation window length')
p.add_argument('--out', default='out/bench')
p.add_argument('--extra', default='', help='more train.py --key=value arguments, given to every run')
a = p.parse_args()
budgets, seeds, methods = [int(b) for b in a.budgets.split(',')], a.seeds.split(','), a.methods.split(',')
if unknown := set(methods) - set(METHODS):
    sys.exit(f'unknown methods {sorted(unknown)}; the methods are {", ".join(METHODS)}')
tag = os.path.basename(a.model.rstrip('/')).lower().removesuffix('.gguf')  # as prepare.data_dir names it
general = os.path.join('data', f'{a.general}_{tag}', 'test.bin')
if not os.path.exists(general):
    sys.exit(f'{general} not found: run  python bench/boolq.py --model={a.model} --tokens=65536')
env = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', **os.environ}  # offline unless the caller says otherwise
TASKS = os.path.join(ROOT, 'tasks')  # the group sparseforge, and offline the local copies (bench/offline_tasks.py)
if a.zero_shot and env['HF_DATASETS_OFFLINE'] == '1' and not os.path.isdir(os.path.join(TASKS, 'local')):
    subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'offline_tasks.py'), os.path.join(TASKS, 'local')],
                   env=env, check=True)
data_dir = os.path.join('data', f'{a.dataset}_{tag}')  # as prepare.data_dir names it
common = [f'--dataset={a.dataset}', f'--batch_size={a.batch_size}', f'--block_size={a.block_size}',
          '--log_interval=1'] + shlex.split(a.extra)

def sh(cmd, log):
    """Run cmd, append its output to the file log, return stdout; a failure stops the bench with its tail."""
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    with open(log, 'a') as f:
        f.write(f'$ {shlex.join(cmd)}\n{r.stdout}{r.stderr}')
    if r.returncode:
        sys.exit(f'failed: {shlex.join(cmd)}\n{r.stderr[-3000:]}')
    return r.stdout

def run(name, iters, seed):
    """One row: train.py, then eval.py on its checkpoint (general perplexity, and zero-shot where asked)."""
    d = os.path.join(a.out, f'{name}_{iters}_s{seed}')
    if os.path.exists(os.path.join(d, 'row.json')):  # done by an earlier bench
        return json.load(open(os.path.join(d, 'row.json')))
    shutil.rmtree(d, ignore_errors=True)  # a row that was stopped half-way
    os.makedirs(d)
    t0 = time.time()
    start = [f'--init_from={a.model}']
    if name in PRUNED:  # one-shot first: a pruned HF checkpoint, fine-tuned (or only scored) under its zeros
        sh([sys.executable, os.path.join(ROOT, 'bench', 'prune.py'), PRUNED[name], f'--model={a.model}',
            f'--dataset={a.dataset}', f'--block_size={a.block_size}', f'--seed={seed}', f'--out={d}/pruned'],
           os.path.join(d, 'log.txt'))
        start = [f'--init_from={d}/pruned', f'--dataset={data_dir}', f'--teacher_from={a.model}']  # a dense teacher
    out = sh([sys.executable, os.path.join(ROOT, 'train.py')] + METHODS[name] + common + start + [
        f'--max_iters={iters}', f'--eval_interval={max(1, iters)}', f'--seed={seed}', f'--out_dir={d}'],
        os.path.join(d, 'log.txt'))
    wall = time.time() - t0
    ms = [float(m) for m in re.findall(r'^iter [1-9]\d*: loss .*?, (\d+)ms', out, re.M)]  # iter 0 warms up
    # each log line shows the last mask update's statistics: a new update where they change (SparseForge's T changes at
    # every update; AST's statistics can repeat, 0 flips twice, and then count once); x is 0 once the mask froze
    stats = re.findall(r'T (\S+) beta .* x (\S+) mid (\S+) dist (\S+) flips (\S+)', out)
    stats = [(T, mid, dist, f) for T, x, mid, dist, f in stats if float(x)]
    updates = [float(s[3]) for i, s in enumerate(stats) if i == 0 or s != stats[i - 1]]  # one per update
    row = dict(method=name, iters=iters, seed=seed, tokens=iters * int(re.search(r'tokens per iteration: ([\d,]+)',
               out)[1].replace(',', '')), val_ppl=float(re.search(r'^final .*: val ppl ([\d.]+)$', out, re.M)[1]),
               flips=updates, wall_s=round(wall), ms_iter=round(sum(ms) / len(ms)) if ms else None)
    zs = str(iters if name not in ONCE else 0) in a.zero_shot.split(',')
    cmd = [sys.executable, os.path.join(ROOT, 'eval.py'), d, f'--data={general}', f'--block_size={a.block_size}']
    if zs:
        cmd.append(f'--export={d}/hf')
    out = sh(cmd, os.path.join(d, 'log.txt'))
    row['general_ppl'] = float(re.search(r' ppl ([\d.]+)', out)[1])
    if zs:  # lm-eval's own command on the export, as the README shows it
        out = sh([sys.executable, '-m', 'lm_eval', '--model', 'hf', '--model_args', f'pretrained={d}/hf,dtype=float32',
                  '--tasks', 'sparseforge', '--include_path', TASKS, '--limit', str(a.limit), '--batch_size', '8'],
                 os.path.join(d, 'log.txt'))
        acc = r'\|[^|]*\|none *\| *0\|acc +\|[^|]*\| *([\d.]+)\|'  # a row of lm-eval's table: its acc
        row |= {t: float(x) for t, x in re.findall(r'^\| - (\w+) *' + acc, out, re.M)}
        row['mean_acc'] = float(re.search(r'^\|sparseforge *' + acc, out, re.M)[1])
        row['acc_no_boolq'] = round((7 * row['mean_acc'] - row['boolq']) / 6, 4)  # BoolQ alone swings on yes/no bias
    for f in os.listdir(d):  # the checkpoint (weights, masks, AdamW: ~1.5 GB for SmolLM2) and the export: not needed
        if os.path.isdir(os.path.join(d, f)):
            shutil.rmtree(os.path.join(d, f))
    json.dump(row, open(os.path.join(d, 'row.json'), 'w'))
    print(f'{name} {iters} iters seed {seed}: val ppl {row["val_ppl"]:.2f}, general {row["general_ppl"]:.2f}'
          + (f', zero-shot {row["mean_acc"] * 100:.2f}' if zs else '') + f', flips per update {updates}, {wall:.0f}s',
          flush=True)
    return row

rows = [run(m, 0, seeds[0]) for m in methods if m in ONCE]
rows += [run(m, b, s) for b in budgets for m in methods if m not in ONCE for s in seeds]
os.makedirs(a.out, exist_ok=True)
cols = ['method', 'iters', 'seed', 'tokens', 'val_ppl', 'general_ppl', 'mean_acc', 'acc_no_boolq', 'flips', 'wall_s',
        'ms_iter']  # flips: a list, one per mask update
cols += sorted({k for r in rows for k in r} - set(cols))  # each task's accuracy
with open(os.path.join(a.out, 'tokens.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, cols)
    w.writeheader()
    w.writerows(rows)

def spread(xs, fmt='{:.2f}'):  # 'mean +- sample std' over seeds, or the value
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return fmt.format(xs[0]) if xs else ''
    return f'{fmt.format(statistics.mean(xs))} +- {fmt.format(statistics.stdev(xs))}'

print(f'\n{"method":<14}{"iters":>6}{"tokens":>9}{"seeds":>6}{"val ppl":>18}{"general ppl":>18}{"zero-shot acc":>17}'
      f'{"w/o boolq":>17}{"flips after the 1st update":>28}')
groups = {}
for r in rows:
    groups.setdefault((r['method'], r['iters']), []).append(r)
for (m, it), rs in groups.items():
    acc = [r['mean_acc'] * 100 for r in rs if 'mean_acc' in r]
    acc6 = [r['acc_no_boolq'] * 100 for r in rs if 'mean_acc' in r]
    print(f'{m:<14}{it:>6}{rs[0]["tokens"]:>9,}{len(rs):>6}{spread([r["val_ppl"] for r in rs]):>18}'
          f'{spread([r["general_ppl"] for r in rs]):>18}{spread(acc):>17}{spread(acc6):>17}'
          f'{spread([sum(r["flips"][1:]) / max(1, len(r["flips"]) - 1) for r in rs], "{:.4f}"):>28}')

fig, axes = plt.subplots(1, 2, figsize=(12, 5))
for ax, key, label in zip(axes, ('val_ppl', 'general_ppl'), (f'{a.dataset} val perplexity', 'general-text perplexity')):
    for i, m in enumerate(dict.fromkeys(r['method'] for r in rows)):
        pts = sorted((it, [r[key] for r in rs]) for (mm, it), rs in groups.items() if mm == m)
        color = plt.cm.tab10(i % 10)
        if m in ONCE:  # 0 tokens: a level to beat, not a point on a log axis
            ax.axhline(pts[0][1][0], color=color, ls='--', lw=1, label=f'{m} (0 tokens)')
            continue
        ys = [statistics.mean(v) for _, v in pts]
        err = [statistics.stdev(v) if len(v) > 1 else 0 for _, v in pts]
        ax.errorbar([it for it, _ in pts], ys, yerr=err, color=color, marker='o', capsize=3, label=m)
    ax.set(xscale='log', xlabel=f'retraining iterations ({a.batch_size} x {a.block_size} tokens)',
           ylabel=label, title=f'{a.model}, 2:4: {label}')
    ax.set_xticks(budgets, [str(b) for b in budgets])  # the budgets themselves, not powers of ten
    ax.minorticks_off()
    ax.grid(True, which='both', alpha=0.3)
axes[0].legend(fontsize=8)
plt.savefig(os.path.join(a.out, 'tokens.png'), dpi=120, bbox_inches='tight')
print(f'wrote {a.out}/tokens.csv and {a.out}/tokens.png')

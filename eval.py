"""Is the sparse model good, and is it really sparse? One line per model.
    python eval.py smollm2 --data=data/pydoc_smollm2/val.bin         # perplexity of an HF name/dir/.gguf
    python eval.py out/ckpt.json --data=... --pattern=2:4            # a train.py checkpoint (or out), pattern checked
    python eval.py out --export=out/hf --tasks=boolq,rte             # export to an HF dir, lm-eval zero-shot
    python eval.py gpt2 --data=data/wikitext2_gpt2/test.bin          # the published protocol (prepare.py wikitext2)
Perplexity as in Wanda/SparseGPT/AST (SPEC section 10): tokens without BOS in non-overlapping windows of the context
length, the remainder dropped, exp of the mean NLL of every predicted token. Never select checkpoints on test."""
import argparse, copy, glob, json, math, os, sys, time, warnings
import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.distributed.checkpoint as DCP
import mask as sf
from model import GPT, GPTConfig
from prepare import locate, load_tokenizer
import sparse_kernels as sk
warnings.filterwarnings('ignore', 'torch.distributed is disabled')  # DCP in one process: what we mean

@torch.no_grad()
def perplexity(model, tokens, block_size, batch_size=8, device='cpu'):
    """exp(mean NLL) over the (n, block_size) windows of 1-D tokens; DDP/FSDP ranks share them, all get the result."""
    n = len(tokens) // block_size  # >= 1: train.py and the CLI check
    windows = torch.from_numpy(np.asarray(tokens[:n * block_size], dtype=np.int64)).view(n, block_size)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    nll = torch.zeros((), dtype=torch.float64, device=device)  # summed over the n * (block_size - 1) predictions
    for i in range(rank * batch_size, -(-n // (world * batch_size)) * world * batch_size, world * batch_size):
        x = windows[min(i, n - 1):i + batch_size].to(device)  # past the end: a 0-weight forward (FSDP's are collective)
        _, loss = model(x[:, :-1], x[:, 1:])  # the last token is only a target (causal)
        nll += loss.double() * x[:, 1:].numel() * (i < n)
    if dist.is_initialized():
        dist.all_reduce(nll)
    return math.exp(nll / (n * (block_size - 1)))

@torch.no_grad()
def generate(model, idx, new_tokens):
    """Greedy decoding with model.forward's KV cache: one prefill of idx (B, T), then one token a step."""
    c = model.config
    cache = [[model.lm_head.weight.new_zeros(len(idx), c.n_kv_head, idx.size(1) + new_tokens, c.head_dim) for _ in 'kv']
             for _ in range(c.n_layer)]  # per layer: k, v
    logits, _ = model(idx, cache=cache)
    for _ in range(new_tokens):
        idx = torch.cat((idx, logits[:, -1:].argmax(-1)), dim=1)
        logits, _ = model(idx[:, -1:], cache=cache, pos=idx.size(1) - 1)
    return idx

@torch.no_grad()
def check_pattern(model, pattern):
    """{decoder linear layer: its groups (mask.groups) with more nonzeros than the pattern allows}; all 0 if exact."""
    nonzero = {f'transformer.h.{name}': sf.groups(((m.weight * getattr(m, 'mask', 1)) != 0).float(), pattern)
               for name, m in model.transformer.h.named_modules() if hasattr(m, 'weight') and m.weight.dim() == 2}
    return {k: ((g > 0).sum(-1) > n).sum().item() for k, (g, n) in nonzero.items()}

PAPER = 'boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa'  # SparseForge's Table 1 (SPEC 10)
TASKS = 'data/tasks'  # lm-eval task files that read local copies offline (bench/offline_tasks.py writes them)
def zero_shot(hf_dir, tasks, tm, limit=None):
    """lm-eval in process on an HF checkpoint dir: its table, then the paper's average (SPEC 10): the mean acc."""
    import lm_eval
    from lm_eval.utils import make_table
    res = lm_eval.simple_evaluate(model='hf', model_args=f'pretrained={hf_dir},dtype=float32', tasks=tasks, limit=limit,
                                  device='cuda' if torch.cuda.is_available() else 'cpu', batch_size=8, task_manager=tm)
    print(make_table(res))
    accs, ses = zip(*[(r['acc,none'], r['acc_stderr,none']) for r in res['results'].values()])
    print(f'mean acc over {len(accs)} tasks {np.mean(accs):.4f} +- {math.hypot(*ses) / len(ses):.4f}')

def read_checkpoint(path, fix):
    """train.py's ckpt.json, and 'dir': its safetensors shards. JSON and safetensors: reading one runs no code."""
    try:
        ckpt = json.load(open(path))
    except (OSError, ValueError):  # missing, empty, truncated, not JSON
        ckpt = None
    if not isinstance(ckpt, dict) or not {'iter_num', 'shards', 'model_args', 'config'} <= ckpt.keys():
        sys.exit(f'{path}: no train.py checkpoint there (missing, truncated or corrupt?); {fix}')
    ckpt['dir'] = os.path.join(os.path.dirname(path), ckpt['shards'])
    if not glob.glob(os.path.join(ckpt['dir'], '*.safetensors')):
        sys.exit(f"{path}: its tensors are missing ({ckpt['dir']}/*.safetensors); {fix}")
    return ckpt

def tensors(state, config):
    """The tensors of a flat state dict as a checkpoint holds them: a tied lm_head is the embedding, stored once."""
    return {k: v for k, v in state.items() if torch.is_tensor(v) and not (config.tie and k == 'lm_head.weight')}

def load(path):
    """(model in eval mode, train.py config or None) from an HF name/dir/.gguf/'smollm2', or train.py's out_dir."""
    if os.path.isfile(os.path.join(path, 'ckpt.json')):
        path = os.path.join(path, 'ckpt.json')
    if not path.endswith('.json'):
        return GPT.from_pretrained(*locate(path)).eval(), None
    ckpt = read_checkpoint(path, 'a train.py checkpoint is out_dir/ckpt.json')
    model, cfg = GPT(GPTConfig(**ckpt['model_args'])), ckpt['config']
    if cfg['method'] != 'dense':
        sf.sparsify(model, cfg['pattern'], cfg['score'], cfg['slorb'])
    reader = DCP.HuggingFaceStorageReader(ckpt['dir'])  # the shards of any number of ranks
    DCP.load(tensors(model.state_dict(), model.config), storage_reader=reader)  # in place, into the model's tensors
    return model.eval(), cfg

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('model', help="HF hub name, local HF dir, .gguf, 'smollm2', or train.py's out_dir or ckpt.json")
    p.add_argument('--data', help='a token .bin from prepare.py (its meta.json gives the dtype)')
    p.add_argument('--block_size', type=int, default=0, help="window length; 0: the model's context")
    p.add_argument('--pattern', help="check the pattern ('2:4', 'block16', ...); a checkpoint's own by default")
    p.add_argument('--export', help='write a standard HF checkpoint dir here (masks folded into the weights)')
    p.add_argument('--tasks', help=f"comma-separated lm-eval tasks, run on the exported dir; 'paper': {PAPER}")
    p.add_argument('--limit', type=int, default=500, help='zero-shot: the first N documents of each task, 0: all')
    p.add_argument('--packed', action='store_true', help='also run it packed (sparse_kernels.py): bytes, ppl, speed')
    p.add_argument('--prompt', help="print the model's greedy continuation of this text")
    p.add_argument('--new_tokens', type=int, default=64, help='tokens to generate: --prompt, --packed decode speed')
    a = p.parse_args()
    for k in ('block_size', 'limit', 'new_tokens'):
        if getattr(a, k) < 0:
            sys.exit(f'--{k}={getattr(a, k)} is not valid: it must be >= 0')
    if a.pattern and not sf.valid(a.pattern):
        sys.exit(f"--pattern={a.pattern} is not valid: use N:M with 0 < N < M (2:4, 4:8, 1:4) or block16")
    meta = a.data and os.path.join(os.path.dirname(a.data), 'meta.json')
    if a.data and not (os.path.isfile(a.data) and os.path.isfile(meta)):  # checked before the model loads
        sys.exit(f'--data={a.data}: no such token file with a meta.json beside it; prepare.py writes both')
    if a.tasks:  # checked before the model loads; offline, lm-eval reads local copies through the files of data/tasks
        import datasets
        from lm_eval.tasks import TaskManager
        tasks = (PAPER if a.tasks == 'paper' else a.tasks).split(',')
        tm = TaskManager(include_path=TASKS if os.path.isdir(TASKS) else None)
        if unknown := [t for t in tasks if t not in tm.all_tasks]:
            sys.exit(f'--tasks: {unknown} are not lm-eval tasks; use lm-eval task names, or paper ({PAPER})')
        missing = [t for t in tasks if not os.path.isfile(f'{TASKS}/{t}.yaml')]
        if datasets.config.HF_DATASETS_OFFLINE and missing:
            sys.exit(f'--tasks: offline, and no local copy of {missing} in {TASKS}: python bench/offline_tasks.py')
    model, cfg = load(a.model)
    source = cfg['init_from'] if cfg else a.model  # a checkpoint: the model it started from, for its tokenizer
    tok = load_tokenizer(source) if a.prompt or a.export or a.tasks else None
    pattern = a.pattern or (cfg and cfg['method'] != 'dense' and cfg['pattern'])
    bad = check_pattern(model, pattern) if pattern else {}
    if pattern:
        print(f'{a.model}: pattern {pattern}: {sum(bad.values())} violating groups in {len(bad)} layers'
              + ''.join(f'\n  {k}: {v}' for k, v in bad.items() if v))
    if a.packed and (pattern not in sk.FORMATS or sum(bad.values()) or cfg and cfg['slorb']):
        sys.exit(f'--packed: {a.model} is not exactly 2:4 or block16 (nor SLoRB); pack a finished run without it')
    models = {'': model}
    if a.packed:  # W * m in plain Linears, then packed; on CUDA in fp16, through the Triton kernel
        sf.merge(model)
        model.to(*('cuda', torch.float16) if torch.cuda.is_available() else ('cpu', torch.float32))
        models = {' masked': model, ' packed': sk.pack_model(copy.deepcopy(model), pattern)}
        mib = [sum(t.nbytes for l in m.transformer.h.modules() if isinstance(l, (nn.Linear, sk.PackedLinear))
                   for k, t in l.state_dict().items() if k != 'bias') / 2**20 for m in models.values()]  # weights
        print(f'{a.model}: decoder weights packed {mib[1]:.2f} MiB, masked {mib[0]:.2f} MiB ({mib[1] / mib[0]:.3f}x), '
              f'{model.lm_head.weight.dtype}')
    for name, m in models.items() if a.data else ():
        tokens, T = np.memmap(a.data, json.load(open(meta))['dtype'], 'r'), a.block_size or m.config.block_size
        if len(tokens) < T:
            sys.exit(f'--data={a.data}: {len(tokens)} tokens, less than one window of {T}; lower --block_size')
        ppl = perplexity(m, tokens, T, device=m.lm_head.weight.device)
        print(f'{a.model}:{name} {a.data} ppl {ppl:.3f} ({len(tokens) // T} windows of {T})')
    for name, m in models.items() if a.packed or a.prompt else ():  # batch 1, after a warm-up (Triton compiles)
        ids = tok.encode(a.prompt, add_special_tokens=False) if a.prompt else [0]
        idx = torch.tensor([ids], device=m.lm_head.weight.device)
        generate(m, idx, 2)
        t0 = time.perf_counter()
        out = generate(m, idx, a.new_tokens).tolist()[0]  # .tolist() waits for the GPU
        print(f'{a.model}:{name} greedy decode {a.new_tokens / (time.perf_counter() - t0):.1f} tokens/s'
              + (f': {a.prompt + tok.decode(out[idx.size(1):])!r}' if a.prompt else ''))
    if a.export or a.tasks:
        out = a.export or 'out/hf_export'
        sf.merge(model)
        model.export(out)
        tok.save_pretrained(out)
        print(f'{a.model}: exported to {out}')
    if a.tasks:
        zero_shot(out, tasks, tm, a.limit or None)

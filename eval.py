"""Is the sparse model good, and is it really sparse? One line per model.
    python eval.py smollm2 --data=data/pydoc_smollm2/val.bin         # perplexity of an HF name/dir/.gguf
    python eval.py out/ckpt.pt --data=... --pattern=2:4              # a train.py checkpoint, pattern checked
    python eval.py out/ckpt.pt --export=out/hf --tasks=boolq,rte     # export to an HF dir, lm-eval zero-shot
    python eval.py gpt2 --data=data/wikitext2_gpt2/test.bin          # the published protocol (prepare.py wikitext2)
Perplexity as in Wanda/SparseGPT/AST (SPEC section 10): tokens without BOS in non-overlapping windows of the context
length, the remainder dropped, exp of the mean NLL of every predicted token. Never select checkpoints on test."""
import argparse, json, math, os
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
    if dist.is_initialized():
        dist.all_reduce(nll)
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

def zero_shot(hf_dir, tasks, **kw):
    """lm-eval in process on an HF checkpoint dir, kw to simple_evaluate: {task: (acc, acc_norm or None)}."""
    import lm_eval
    res = lm_eval.simple_evaluate(model='hf', model_args=f'pretrained={hf_dir},dtype=float32', tasks=tasks, batch_size=8,
                                  device='cuda' if torch.cuda.is_available() else 'cpu', **kw)
    return {t: (r['acc,none'], r.get('acc_norm,none')) for t, r in res['results'].items() if 'acc,none' in r}

def load(path):
    """(model in eval mode, train.py config or None) from an HF name/dir/.gguf/'smollm2' or a train.py checkpoint."""
    if not path.endswith('.pt'):
        return GPT.from_pretrained(*locate(path)).eval(), None
    ckpt = torch.load(path, map_location='cpu', weights_only=False)
    model, cfg = GPT(GPTConfig(**ckpt['model_args'])), ckpt['config']
    if cfg['method'] != 'dense':
        sf.sparsify(model, cfg['pattern'], cfg['slorb_k'], cfg['score'])
    model.load_state_dict(ckpt['model'])
    return model.eval(), cfg

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('model', help="HF hub name, local HF dir, .gguf, 'smollm2', or a train.py checkpoint .pt")
    p.add_argument('--data', help='a token .bin from prepare.py (its meta.json gives the dtype)')
    p.add_argument('--block_size', type=int, default=0, help="window length; 0: the model's context")
    p.add_argument('--pattern', help="check the pattern ('2:4', 'block16', ...); a checkpoint's own by default")
    p.add_argument('--export', help='write a standard HF checkpoint dir here (masks folded into the weights)')
    p.add_argument('--tasks', help='comma-separated lm-eval tasks, run on the exported dir')
    p.add_argument('--limit', type=int, help='lm-eval: examples per task (for a quick look only)')
    a = p.parse_args()
    model, cfg = load(a.model)
    src = cfg['init_from'] if cfg else a.model  # a checkpoint's tokenizer is that of the model it started from
    if pattern := a.pattern or (cfg and cfg['method'] != 'dense' and cfg['pattern']):
        bad = check_pattern(model, pattern)
        print(f'{a.model}: pattern {pattern}: {sum(bad.values())} violating groups in {len(bad)} layers'
              + ''.join(f'\n  {k}: {v}' for k, v in bad.items() if v))
    T = a.block_size or model.config.block_size
    if a.data:
        dtype = json.load(open(os.path.join(os.path.dirname(a.data), 'meta.json')))['dtype']
        print(f'{a.model}: {a.data} ppl {perplexity(model, np.memmap(a.data, dtype=dtype, mode="r"), T):.3f}')
    if a.export or a.tasks:
        out = a.export or 'out/hf_export'
        sf.merge(model)
        from transformers import AutoTokenizer
        d, f = locate(src)
        model.export(out, AutoTokenizer.from_pretrained(d, gguf_file=f))
        print(f'{a.model}: exported to {out}')
        for t, (acc, acc_norm) in zero_shot(out, a.tasks.split(','), limit=a.limit).items() if a.tasks else []:
            print(f'{a.model}: {t} acc {acc:.4f}' + (f' acc_norm {acc_norm:.4f}' if acc_norm is not None else ''))

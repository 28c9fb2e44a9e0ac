"""One-shot pruning baselines: magnitude, Wanda and SparseGPT, written as a standard Hugging Face checkpoint with exact
zeros where pruned. train.py then fine-tunes it under its own zeros (prune-then-fine-tune), as it would a model pruned
by any other tool:
    python bench/prune.py sparsegpt --model=smollm2 --out=out/sparsegpt        # or wanda, magnitude; --pattern=block16
    python train.py --init_from=out/sparsegpt --mask_init=zeros --teacher_from=smollm2 --dataset=data/pydoc_smollm2
Blocks are pruned in order, each calibrated on the outputs of the already-pruned blocks before it (Wanda, SparseGPT)."""
import argparse, json, os, sys
import numpy as np
import torch
import torch.nn as nn
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mask as sf
from model import GPT
from prepare import data_dir, load_tokenizer, locate

def sparsegpt(W, H, n, m, blocksize=128):
    """SparseGPT (Frantar & Alistarh 2023) for N:M: column-wise OBS with lazy batch updates. W (D, C),
    H = 2 X^T X / tokens (C, C). The pattern is picked on the already-updated weights; returns (W', keep)."""
    W, C = W.clone().float(), W.size(1)
    H = H + 0.01 * H.diagonal().mean() * torch.eye(C, device=W.device)  # dampening: positive definite, dead inputs
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    keep = torch.ones_like(W)
    for i1 in range(0, C, blocksize):
        i2 = min(i1 + blocksize, C)
        W1, Hi = W[:, i1:i2], Hinv[i1:i2, i1:i2]  # W1 a view: updates W
        err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if i % m == 0:  # OBS saliency w^2 / [H^-1]_jj^2 picks the M - N to prune in this group
                sal = W1[:, i:i + m] ** 2 / Hi.diagonal()[i:i + m] ** 2
                keep[:, i1 + i:i1 + i + m] = sf.topn(sal, n)[0]
            q = W1[:, i] * keep[:, i1 + i]
            err[:, i] = (W1[:, i] - q) / Hi[i, i]
            W1[:, i:] -= err[:, i:i + 1] * Hi[i:i + 1, i:]  # re-fit the columns still to come
            W1[:, i] = q
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]
    return W * keep, keep

@torch.no_grad()
def prune(model, method, pattern, calib):
    """Prune every nn.Linear of the decoder blocks in place, block by block, on calib (B, T) token ids."""
    x, rope = model.embed(calib)
    for block in model.transformer.h:
        linears = [l for l in block.modules() if isinstance(l, nn.Linear)]
        xtx = {l: 0 for l in linears}  # the running X^T X of each layer's input (C, C)

        def collect(l, inp, out):
            a = inp[0].flatten(0, 1).double()
            xtx[l] = xtx[l] + a.T @ a
        hooks = [l.register_forward_hook(collect) for l in linears]
        block(x, rope)
        for h in hooks:
            h.remove()
        for l in linears:
            H = (2 * xtx[l] / calib.numel()).float()
            if method == 'sparsegpt':  # N:M only; it also re-fits the kept weights
                w, keep = sparsegpt(l.weight, H, *map(int, pattern.split(':')))
                l.weight.copy_(w)
            else:  # |W| (magnitude) or |W| ||x_j|| (Wanda: E[x_j^2] is H's diagonal / 2)
                scale = (H.diagonal() / 2).sqrt() if method == 'wanda' else torch.ones(l.weight.size(1))
                keep = sf.project(l.weight.abs() * scale, pattern)
            l.weight.mul_(keep).masked_fill_(keep == 0, 0.0)  # +0.0 where pruned
        x = block(x, rope)  # the next block sees this block's pruned output

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('method', choices=['magnitude', 'wanda', 'sparsegpt'])
    p.add_argument('--model', default='smollm2', help="HF hub name, local HF dir, .gguf or 'smollm2'")
    p.add_argument('--dataset', default='pydoc', help='calibration from data/<dataset>_<model>/train.bin (prepare.py)')
    p.add_argument('--pattern', default='2:4', help="'N:M' or 'block16' (SparseGPT: N:M only)")
    p.add_argument('--n_calib', type=int, default=32, help='calibration sequences (the papers: 128)')
    p.add_argument('--block_size', type=int, default=256, help='tokens per calibration sequence')
    p.add_argument('--seed', type=int, default=1337)
    p.add_argument('--out', required=True, help='the pruned HF checkpoint dir to write')
    a = p.parse_args()
    if not sf.valid(a.pattern) or a.method == 'sparsegpt' and a.pattern == 'block16':
        sys.exit(f'--pattern={a.pattern} is not valid for {a.method}: use N:M with 0 < N < M '
                 '(or block16, except for SparseGPT)')
    if a.n_calib <= 0 or a.block_size <= 0:
        sys.exit('--n_calib and --block_size must be > 0')
    ddir = data_dir(a.dataset, a.model)
    if not os.path.exists(os.path.join(ddir, 'meta.json')):
        sys.exit(f'{ddir}/meta.json not found: run  python prepare.py {a.dataset} --model={a.model}')
    tokens = np.memmap(os.path.join(ddir, 'train.bin'), dtype=json.load(open(f'{ddir}/meta.json'))['dtype'], mode='r')
    g = torch.Generator().manual_seed(a.seed)
    starts = torch.randint(len(tokens) - a.block_size, (a.n_calib,), generator=g).tolist()
    calib = torch.stack([torch.from_numpy(tokens[i:i + a.block_size].astype(np.int64)) for i in starts])
    model = GPT.from_pretrained(*locate(a.model)).eval()
    prune(model, a.method, a.pattern, calib)
    model.export(a.out)
    load_tokenizer(a.model).save_pretrained(a.out)
    print(f'one-shot {a.method} {a.pattern} on {a.n_calib} x {a.block_size} tokens of {a.dataset}: wrote {a.out}')

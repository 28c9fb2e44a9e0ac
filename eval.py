"""Is the sparse model good, and is it really sparse? One line per model.
    python eval.py smollm2 --data=data/pydoc_smollm2/val.bin   # perplexity of an HF name, HF dir or .gguf
    python eval.py out --data=data/pydoc_smollm2/val.bin       # a train.py run (out_dir): its pattern checked, ppl
    python eval.py out --export=out/hf                         # a standard HF checkpoint: lm-eval, transformers
    python eval.py out --data=data/pydoc_smollm2/val.bin --packed   # packed weights: their bytes, the same ppl
    python eval.py gpt2 --data=data/wikitext2_gpt2/test.bin    # the published protocol (prepare.py wikitext2)
Perplexity as Wanda, SparseGPT and AST report it: tokens without BOS in non-overlapping windows of the context length,
the remainder dropped, exp of the mean NLL of every predicted token. Never select checkpoints on test."""
import argparse, copy, glob, json, math, os, sys, warnings
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
def perplexity(model, tokens, block_size, batch_tokens=2048, device='cpu'):
    """exp(mean NLL) over the (n, block_size) windows of 1-D tokens, batch_tokens at a time (at least one window).
    Under DDP or FSDP the ranks share the windows and all get the result."""
    n = len(tokens) // block_size  # >= 1: train.py and the CLI check
    windows = torch.from_numpy(np.asarray(tokens[:n * block_size], dtype=np.int64)).view(n, block_size)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batch = max(1, batch_tokens // block_size)
    nll = torch.zeros((), dtype=torch.float64, device=device)  # summed over the n * (block_size - 1) predictions
    for step in range(-(-n // (world * batch))):  # as many forwards on every rank: FSDP's forwards are collective
        i = (step * world + rank) * batch
        x = windows[min(i, n - 1):i + batch].to(device)  # past the end: the last window again, not counted
        _, loss = model(x[:, :-1], x[:, 1:])  # the last token is only a target (causal)
        if i < n:
            nll += loss.double() * x[:, 1:].numel()
    if dist.is_initialized():
        dist.all_reduce(nll)
    return math.exp(nll / (n * (block_size - 1)))

@torch.no_grad()
def check_pattern(model, pattern):
    """{decoder linear layer: its groups with more nonzeros than the pattern allows}; all 0 if it is the pattern."""
    return {f'transformer.h.{name}': sf.violations(m.weight * getattr(m, 'mask', 1), pattern)
            for name, m in model.transformer.h.named_modules() if hasattr(m, 'weight') and m.weight.dim() == 2}

def weight_bytes(model):
    """Bytes of the decoder's weights as stored (packed: values and indices), biases aside."""
    layers = [l for l in model.transformer.h.modules() if isinstance(l, (nn.Linear, sk.PackedLinear))]
    return sum(t.nbytes for l in layers for name, t in l.state_dict().items() if name != 'bias')

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
    p.add_argument('--packed', action='store_true', help='also pack it (sparse_kernels.py): weight bytes, perplexity')
    a = p.parse_args()
    if a.block_size < 0:
        sys.exit(f'--block_size={a.block_size} is not valid: it must be >= 0')
    if a.pattern and not sf.valid(a.pattern):
        sys.exit(f"--pattern={a.pattern} is not valid: use N:M with 0 < N < M (2:4, 4:8, 1:4) or block16")
    meta = a.data and os.path.join(os.path.dirname(a.data), 'meta.json')
    if a.data and not (os.path.isfile(a.data) and os.path.isfile(meta)):  # checked before the model loads
        sys.exit(f'--data={a.data}: no such token file with a meta.json beside it; prepare.py writes both')
    model, cfg = load(a.model)
    pattern = a.pattern or (cfg and cfg['method'] != 'dense' and cfg['pattern'])
    bad = check_pattern(model, pattern) if pattern else {}
    if pattern:
        print(f'{a.model}: pattern {pattern}: {sum(bad.values())} violating groups in {len(bad)} layers')
        for name, count in bad.items():
            if count:
                print(f'  {name}: {count}')
    if a.packed and (pattern not in sk.FORMATS or sum(bad.values()) or cfg and cfg['slorb']):
        sys.exit(f'--packed: {a.model} is not exactly 2:4 or block16 (nor SLoRB); pack a finished run without it')
    models = {'': model}
    if a.packed:  # W * m in plain Linears, then packed; on CUDA in fp16, through the Triton kernels
        sf.merge(model)
        if torch.cuda.is_available():
            model.to('cuda', torch.float16)
        models = {' masked': model, ' packed': sk.pack_model(copy.deepcopy(model), pattern)}
        packed, masked = weight_bytes(models[' packed']), weight_bytes(model)
        print(f'{a.model}: decoder weights packed {packed / 2**20:.2f} MiB, masked {masked / 2**20:.2f} MiB '
              f'({packed / masked:.3f}x), {model.lm_head.weight.dtype}')
    if a.data:
        tokens = np.memmap(a.data, json.load(open(meta))['dtype'], 'r')
        T = a.block_size or model.config.block_size
        if len(tokens) < T:
            sys.exit(f'--data={a.data}: {len(tokens)} tokens, less than one window of {T}; lower --block_size')
        for name, m in models.items():
            ppl = perplexity(m, tokens, T, device=m.lm_head.weight.device)
            print(f'{a.model}:{name} {a.data} ppl {ppl:.3f} ({len(tokens) // T} windows of {T})')
    if a.export:  # with the tokenizer of the model it started from: lm-eval and transformers load the dir as is
        sf.merge(model)
        model.export(a.export)
        load_tokenizer(cfg['init_from'] if cfg else a.model).save_pretrained(a.export)
        print(f'{a.model}: exported to {a.export}')

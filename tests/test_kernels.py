"""
Packed formats round-trip exactly; Triton kernels == PyTorch twins == dense matmul; module swap is a no-op.
On CPU the kernels run in the Triton interpreter (conftest.py sets it); on CUDA they run for real.

    python -m pytest tests/test_kernels.py -q
"""
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
cuda = torch.cuda.is_available()
from conftest import run
import sparse_kernels as sk  # conftest.py set TRITON_INTERPRET=1 on CPU
from eval import generate

dev = 'cuda' if cuda else 'cpu'
pytestmark = pytest.mark.skipif(not (cuda or sk.INTERPRET), reason='sparse_kernels was imported before TRITON_INTERPRET=1')
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if cuda else [])  # bf16 is garbage in the interpreter
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

def sparse24(D, C, dtype):
    # random 2:4 weight; row 0 has groups with 1 and 0 nonzeros, to exercise the padding positions
    idx = torch.rand(D, C // 4, 4).topk(2, -1).indices
    w = torch.zeros(D, C // 4, 4).scatter(-1, idx, torch.randn(D, C // 4, 2)).view(D, C)
    w[0, :4], w[0, 5] = 0, 0
    return w.to(dev, dtype)

def sparse16(D, C, dtype):
    # random block16 weight with unbalanced bands (band 0 empty): BSR stores any tile pattern
    keep = torch.rand(D // 16, C // 16) < 0.5
    keep[0], keep[-1, 0] = False, True
    w = torch.randn(D, C) * keep.repeat_interleave(16, 0).repeat_interleave(16, 1)
    return w.to(dev, dtype)

@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)

def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()

@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_roundtrip(dtype):
    w = sparse24(32, 100, dtype)  # 25 groups: meta's last byte is half padding
    vals, meta = sk.pack24(w)
    assert vals.shape == (32, 50) and meta.shape == (32, 13) and meta.dtype == torch.uint8
    assert torch.equal(sk.unpack24(vals, meta), w)
    w = sparse16(64, 96, dtype)
    tiles, crow, col = sk.pack_block16(w)
    n = int((w.view(4, 16, 6, 16) != 0).any(3).any(1).sum())  # the nonzero tiles, and only they, are stored
    assert tiles.shape == (n, 16, 16) and len(crow) == 5 and len(col) == n
    assert torch.equal(sk.bsr(tiles, crow, col, 96).to_dense(), w)

def test_pack_errors():
    w = sparse24(32, 64, torch.float32)
    w[3, 8:11] = 1.  # 3 nonzeros in one group
    with pytest.raises(ValueError, match=r'not 2:4: 1 of 512 groups'):
        sk.pack24(w)

# (lead dims of x, D, C): M = 1 (decode), odd M, M above one 16-row block, 3-D x, C not a multiple of the K step
SHAPES = [((1,), 32, 64), ((3,), 48, 96), ((17,), 32, 128), ((2, 5), 48, 64), ((70,), 32, 112)]

@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('lead,D,C', SHAPES)
@pytest.mark.parametrize('pattern', ['2:4', 'block16'])
def test_matmul(pattern, lead, D, C, dtype):
    if pattern == 'block16' and dtype != torch.float32 and not cuda:
        pytest.skip("torch's CPU sparse matmul is fp32 (on CUDA, its Triton BSR kernel takes fp16 and bf16)")
    make, pack, kernel, twin = {
        '2:4': (sparse24, sk.pack24, sk.matmul24, sk.matmul24_ref),
        'block16': (sparse16, sk.pack_block16, sk.matmul_block16, sk.matmul_block16_ref)}[pattern]
    w = make(D, C, dtype)
    x = torch.randn(*lead, C, device=dev, dtype=dtype)
    for b in (None, torch.randn(D, device=dev, dtype=dtype)):
        ref = x.double() @ w.double().T + (0 if b is None else b.double())
        y, y_twin = kernel(x, *pack(w), b), twin(x, *pack(w), b)
        assert y.shape == (*lead, D) and y.dtype == dtype
        assert rel_err(y, ref) < TOL[dtype] and rel_err(y_twin, ref) < TOL[dtype]

class Tiny(nn.Module):
    # the shape of model.py's GPT that pack_model relies on: transformer.h is a ModuleList of blocks
    def __init__(self, C=64):
        super().__init__()
        block = lambda: nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C, bias=False))
        self.transformer = nn.ModuleDict(dict(h=nn.ModuleList([block(), block()])))
        self.lm_head = nn.Linear(C, 32, bias=False)

    def forward(self, x):
        for block in self.transformer.h:
            x = x + block(x)
        return self.lm_head(x)

@pytest.mark.parametrize('pattern', ['2:4', 'block16'])
def test_pack_model(pattern):
    model = Tiny().to(dev)
    with torch.no_grad():  # prune the decoder Linears into the pattern: 2:4 by magnitude, block16 every other tile
        for m in model.transformer.h.modules():
            if isinstance(m, nn.Linear) and pattern == '2:4':
                g = m.weight.view(m.out_features, -1, 4)
                g.scatter_(-1, g.abs().topk(2, -1, largest=False).indices, 0)
            elif isinstance(m, nn.Linear):
                m.weight.view(m.out_features // 16, 16, -1, 32)[..., 16:] = 0
    x = torch.randn(2, 5, 64, device=dev)
    with torch.no_grad():
        y = model(x)
        sk.pack_model(model, pattern)
        y_packed = model(x)
    assert isinstance(model.transformer.h[0][0], sk.PackedLinear) and type(model.lm_head) is nn.Linear
    assert not any(k.endswith('weight') for k in model.transformer.h.state_dict())  # only packed buffers
    assert rel_err(y_packed, y.double()) < 1e-5

@pytest.mark.skipif(cuda, reason='checks the CPU fallback')
@pytest.mark.parametrize('pattern', ['2:4', 'block16'])
def test_finalised_model_decodes_the_same_packed(pattern):
    # the deployment path: train.py's finalised SparseLinear model -> mask.merge -> pack_model -> KV-cache decode
    import mask
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig('llama', block_size=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                          head_dim=16, n_inner=64, qkv_bias=False, o_bias=False, mlp_bias=False)).to(dev).eval()
    layers = mask.sparsify(model, pattern)
    for l in layers:  # magnitude masks
        l.proj.copy_(mask.project(l.weight.detach().abs(), pattern))  # finalize() freezes m = Proj(m)
    mask.finalize(layers)
    mask.merge(model)
    idx = torch.randint(0, 64, (2, 5), device=dev)
    dense_logits, ref = model(idx)[0], generate(model, idx, 6)
    sk.pack_model(model, pattern)
    assert not any(hasattr(m, 'mask') for m in model.modules())  # packed weights only
    assert torch.allclose(model(idx)[0], dense_logits, atol=1e-4) and torch.equal(generate(model, idx, 6), ref)

def test_cpu_without_interpreter_uses_twin(monkeypatch):
    # without TRITON_INTERPRET a Triton launch on CPU would fail, so this passing means the twin ran
    monkeypatch.setattr(sk, 'INTERPRET', False)
    l = nn.Linear(64, 32)
    l.weight.data.view(32, 16, 4)[..., :2] = 0
    x = torch.randn(3, 64)
    assert torch.allclose(sk.PackedLinear(l, '2:4')(x), l(x))

@pytest.mark.skipif(cuda, reason='on a GPU bench/kernel_speed.py also times everything: run it by hand')
def test_compiles_for_the_gpu_without_one():
    """The 2:4 kernel compiles for sm_80 and sm_90 on this CPU (Triton's bundled ptxas) in every launch configuration:
    within the registers and shared memory of the target, and with no register spills in fp16 and bf16 (the GPU
    dtypes; fp32's exact 'ieee' dot spills). Through bench/kernel_speed.py in its own process: Triton compiles for a GPU
    only outside its interpreter, which this process runs (a fresh cache failed at the first tl.arange)."""
    p = run('bench/kernel_speed.py', env={'TRITON_INTERPRET': '0'})
    rows = re.findall(r'sm_(\d+) (\w+) +(\w+) +BM,BN,BK=.*: +(\d+) registers, (\d+) bytes spilled, '
                      r'([\d,]+) bytes shared \(limit ([\d,]+)\)', p.stdout)
    assert len(rows) == 2 * 3 * 2, p.stdout + p.stderr[-3000:]  # sm_80, sm_90 x fp16, bf16, fp32 x decode, prefill
    for cc, dtype, name, regs, spilled, shared, limit in rows:
        assert int(regs) <= 255 and 0 < int(shared.replace(',', '')) <= int(limit.replace(',', '')), (cc, dtype, name)
        assert spilled == '0' or dtype == 'float32', (cc, dtype, name, spilled)

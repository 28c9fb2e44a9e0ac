"""The mask algorithm against its definitions: exact patterns, the gate's N above 0.5, the Fisher estimate against
per-token gradients and the exact Gauss-Newton diagonal, the straight-through gradient, +0.0 after finalisation, SparseGPT < Wanda < magnitude."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import mask as sf
from model import GPT, GPTConfig

def layer(D=32, C=64, pattern='2:4', seed=0):
    torch.manual_seed(seed)
    return sf.SparseLinear(nn.Linear(C, D), pattern)

@pytest.mark.parametrize('pattern,n,m', [('2:4', 2, 4), ('4:8', 4, 8), ('1:4', 1, 4)])
def test_nm_projection_and_gate(pattern, n, m):
    l = layer(pattern=pattern)
    ties = torch.randint(0, 3, (32, 64)).float()  # many ties inside the groups
    assert (sf.project(ties, pattern).view(-1, m).sum(-1) == n).all()
    sf.update([l], 'magnitude', T=0.5, beta=0.0, lam=0.0, alpha=1.0)  # alpha = 1: the mask is the gate G
    assert ((l.mask > 0.5).view(-1, m).sum(-1) == n).all()  # Eq. 3: exactly N above 0.5 per group
    assert torch.equal(l.proj, (l.mask > 0.5).float())
    assert torch.equal(l.proj, sf.project(l.weight.abs(), pattern))  # magnitude top-N

def test_block16():
    t = torch.randint(0, 2, (48, 64)).float()  # ties between tiles too
    p = sf.project(t, 'block16').view(3, 16, 4, 16)
    assert ((p == p[:, :1, :, :1]).all())  # whole tiles kept or dropped
    assert (p[:, 0, :, 0].sum(-1) == 2).all()  # exactly half the tiles of every 16-row band
    l = layer(48, 64, 'block16')
    sf.update([l], 'magnitude', T=0.5, beta=0.0, lam=0.0, alpha=1.0)
    assert ((l.mask > 0.5).view(3, 16, 4, 16)[:, 0, :, 0].sum(-1) == 2).all()
    tiles = l.weight.detach().abs().view(3, 16, 4, 16).sum((1, 3))  # ranked by the summed score
    assert torch.equal(l.proj.view(3, 16, 4, 16)[:, 0, :, 0], sf.topn(tiles, 2)[0])

def test_fisher_is_exact_and_estimates_the_gauss_newton_diagonal():
    """The backward's estimate is the per-position Fisher sum_t (dl_t/dW)^2 exactly (per-token gradients from
    torch.func as the reference); with labels drawn from the model it averages to the exact Gauss-Newton diagonal
    of the loss, diag(J^T H_logits J), the curvature OBD uses."""
    torch.manual_seed(0)
    l = layer(4, 8)
    l.mask.uniform_()  # a soft mask: the gradient is taken at W_eff = W * m, passed straight through to W
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    logits = lambda w, x: torch.tanh(F.linear(x, w, l.bias)) * 3
    w_eff = (l.weight * l.mask).detach()
    per_token = torch.func.vmap(torch.func.grad(lambda w, x, y: F.cross_entropy(logits(w, x), y)), (None, 0, 0))
    exact = per_token(w_eff, x[:, None], y[:, None]).square().sum(0) / 16 ** 2  # dL/dy_t of the mean loss is 1/16
    l.estimate = True
    F.cross_entropy(torch.tanh(l(x)) * 3, y).backward()
    assert torch.allclose(l.hess.grad, exact, rtol=1e-5, atol=1e-12)  # the step's estimate, in hess.grad
    sf.step_statistics([l], micro_steps=1)
    assert torch.allclose(l.hess / 0.02, exact, rtol=1e-5, atol=1e-12) and l.hess.grad is None  # H = 0.02 * estimate
    ggn = torch.zeros(4, 8)
    for xt in x:  # J^T (diag(p) - p p^T) J per token, J = d logits / dW (4, 4 * 8)
        J = torch.func.jacrev(logits)(w_eff, xt).reshape(4, 32)
        p = logits(w_eff, xt).softmax(-1)
        ggn += (J.T @ (torch.diag(p) - p[:, None] * p) @ J).diagonal().view(4, 8) / 16 ** 2
    with torch.no_grad():
        probs = logits(w_eff, x).softmax(-1)
    mean = torch.zeros(4, 8)
    for _ in range(2000):  # labels drawn from the model, one estimate each
        l.hess.grad = None
        F.cross_entropy(torch.tanh(l(x)) * 3, torch.multinomial(probs, 1)[:, 0]).backward()
        mean += l.hess.grad / 2000
    assert (mean - ggn).norm() / ggn.norm() < 0.05

def test_statistics_advance_once_per_step():
    """Gradient accumulation: the micro-steps' estimates add up in hess.grad, and the EMA advances once a step, by
    their mean per micro-batch (the loss divided by the micro-steps, as train.py divides it); x_sq alike."""
    l, ref = layer(4, 8), layer(4, 8)  # the same weights
    l.estimate = ref.estimate = True
    x = torch.randn(3, 16, 8)
    estimates = []
    for xm in x:
        (l(xm).square().mean() / 3).backward()
        ref.hess.grad = None
        ref(xm).square().mean().backward()
        estimates.append(ref.hess.grad)
    assert torch.equal(l.hess, torch.zeros(4, 8))  # nothing moved yet
    sf.step_statistics([l], micro_steps=3)
    assert torch.allclose(l.hess, 0.02 * sum(estimates) / 3, rtol=1e-5, atol=1e-12)
    w = sf.SparseLinear(nn.Linear(8, 4), '2:4', score='wanda')  # the wanda statistic E[x_j^2] the same way
    for xm in x:
        w(xm)
    assert torch.equal(w.x_sq, torch.zeros(8))
    sf.step_statistics([w], micro_steps=3)
    assert torch.allclose(w.x_sq, 0.02 * x.square().mean((0, 1))) and not w.x_sum.any()

def test_fisher_in_a_model_carries_signal():
    torch.manual_seed(0)
    model = GPT(GPTConfig('llama', block_size=32, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                          head_dim=16, n_inner=128, qkv_bias=False, o_bias=False, mlp_bias=False))
    layers = sf.sparsify(model, '2:4')
    for l in layers:
        l.estimate = True
    idx = torch.randint(0, 64, (4, 32))
    model(idx, idx)[1].backward()  # an ordinary backward, through fused attention
    sf.step_statistics(layers, micro_steps=1)
    for l in layers:
        assert l.hess.min() >= 0 and l.hess.mean() > 0
        differs = (sf.project(sf.score(l, 'hessian'), '2:4') != sf.project(sf.score(l, 'magnitude'), '2:4'))
        assert 0.05 < differs.float().mean() < 0.6  # the curvature changes the ranking, not everything

def test_straight_through_then_frozen():
    l = layer()
    l.mask.uniform_()
    x = torch.randn(5, 64)
    w = (l.weight * l.mask).detach().requires_grad_()
    F.linear(x, w, l.bias).pow(2).sum().backward()
    l(x).pow(2).sum().backward()
    assert torch.allclose(l.weight.grad, w.grad, atol=1e-5)  # STE: dL/dW = dL/dW_eff, unmasked
    opt = torch.optim.AdamW(l.parameters(), lr=0.1)
    opt.step()  # Adam moments now nonzero everywhere
    sf.update([l], 'magnitude', T=0.5, beta=0.0, lam=0.0, alpha=1.0)
    sf.finalize([l], opt)
    pruned = l.proj == 0
    for _ in range(3):  # train.py's step after finalize masks dW; Adam would still move pruned weights
        opt.zero_grad()    # if finalize had not cleared their moments
        l(x).pow(2).sum().backward()
        l.weight.grad.mul_(l.mask)
        opt.step()
    zeros = l.weight[pruned]
    assert (zeros == 0).all() and not torch.signbit(zeros).any()  # exact +0.0, never -0.0
    assert (l.weight[~pruned] != 0).all() and pruned.float().mean() == 0.5

def test_sparsegpt_beats_wanda_beats_magnitude():  # bench/prune.py's one-shot baselines
    from bench.prune import sparsegpt
    torch.manual_seed(0)
    C, D = 64, 32
    X = torch.randn(2048, 16) @ torch.randn(16, C) + 0.1 * torch.randn(2048, C)  # correlated inputs
    X *= torch.logspace(-1, 1, C)[torch.randperm(C)]  # features of different scale: magnitude alone is misled
    W = torch.randn(D, C)
    H = 2 * X.T @ X / len(X)
    err = lambda Wp: ((X @ W.T - X @ Wp.T) ** 2).mean().item()
    mag = err(W * sf.project(W.abs(), '2:4'))
    wanda = err(W * sf.project(W.abs() * X.pow(2).mean(0).sqrt(), '2:4'))
    Wsg, keep = sparsegpt(W, H.clone(), 2, 4, blocksize=32)
    assert (keep.view(-1, 4).sum(-1) == 2).all() and torch.equal(Wsg != 0, keep.bool())
    sgpt = err(Wsg)
    assert sgpt < 0.8 * wanda and wanda < 0.8 * mag, (sgpt, wanda, mag)

def saved_bytes(module, x):
    """Bytes the forward of module keeps for its backward, beyond its own parameters and buffers (alive anyway)."""
    own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        module(x)
    return sum(t.untyped_storage().nbytes() for t in saved if t.untyped_storage().data_ptr() not in own)

def test_sparse_linear_saves_what_a_linear_saves():
    """No (D, C) product of weight and mask is kept for the backward: a SparseLinear keeps what nn.Linear keeps (x)."""
    lin = nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    l = sf.SparseLinear(lin, '2:4', score='hessian')
    l.mask.uniform_()
    l.x.fill_(0.5)  # mid-quench: m_eff = lerp(proj, mask, 0.5) is computed, not stored
    l.estimate = True
    assert saved_bytes(lin, x) == saved_bytes(l, x) == x.numel() * 4

def test_slorb_starts_at_the_teacher_and_folds_into_the_export():
    """SLoRB (Eq. 1): B = 0 at the start (the student is the dense model), y += (P x) B^T with P summing each k
    consecutive inputs; merge() folds B P into the exported weight, with the same output."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    l, x = sf.SparseLinear(lin, '2:4', slorb=16), torch.randn(3, 64)
    assert l.slorb.shape == (32, 4) and torch.equal(l(x), lin(x))
    l.slorb.data.normal_()
    l.proj.copy_(sf.project(l.weight.detach().abs(), '2:4'))
    sf.finalize([l])
    P = torch.eye(4).repeat_interleave(16, 1)  # (C/k, C): row j sums inputs 16j .. 16j + 15
    expected = x @ (l.weight * l.mask).T + l.bias + x @ P.T @ l.slorb.T
    assert torch.allclose(l(x), expected, atol=1e-5)
    holder = nn.Module()
    holder.l = l
    sf.merge(holder)
    assert type(holder.l) is nn.Linear and torch.allclose(holder.l(x), expected, atol=1e-5)

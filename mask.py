"""SparseForge's soft mask (paper 4.2-4.3, SPEC 2-9) as a module swap: sparsify() swaps every decoder nn.Linear for a
SparseLinear; train.py calls update() (Eq. 3-5), then finalize() at hard_end; one_shot() runs the baselines.
Mask state: fp32 buffers of the layer (FSDP: mask and proj frozen Parameters, sharded by rows with W)."""
import torch
import torch.nn as nn

def valid(pattern):  # 'block16', or 'N:M' with 0 < N < M
    n, _, m = pattern.partition(':')
    return pattern == 'block16' or n.isdigit() and m.isdigit() and 0 < int(n) < int(m)

def groups(t, pattern):
    """(D, C) -> groups (G, M), N winners each: 'N:M', M entries along C; 'block16', a band's 16x16 tiles, half kept."""
    if pattern == 'block16':
        return t.view(t.size(0) // 16, 16, -1, 16).sum((1, 3)), t.size(1) // 32
    n, m = map(int, pattern.split(':'))
    return t.reshape(-1, m), n

def ungroup(g, shape, pattern):
    """Inverse of groups() for a per-entry (G, M) result: tiles are broadcast back to their 16x16 entries."""
    return g.repeat_interleave(16, 0).repeat_interleave(16, 1) if pattern == 'block16' else g.reshape(shape)

def topn(g, n):
    """Hard top-n per row; ties go to the lower index (a stable sort), so the count is always exact."""
    order = g.argsort(dim=-1, descending=True, stable=True)
    return torch.zeros_like(g).scatter_(-1, order[:, :n], 1.0), order

def project(t, pattern):
    """Proj: the exact binary pattern (D, C) that keeps the largest entries of t per group."""
    return ungroup(topn(*groups(t, pattern))[0], t.shape, pattern)

class MaskedLinear(torch.autograd.Function):
    """y = x (W m)^T + b, m = lerp(proj, mask, q) (SPEC 6), dL/dW = dL/d(W m) (SPEC 3). The backward recomputes W m (no
    (D, C) product kept) and, given hess, adds the Fisher sum_t (dL/dy_t)^2 x_t^2 to its EMA (FSDP: as its gradient)."""
    @staticmethod
    def forward(ctx, x, w, mask, proj, q, b, hess):  # under autocast F.linear casts; the backward casts explicitly
        y = nn.functional.linear(x, w * proj.lerp(mask, q).to(w.dtype), b)
        ctx.save_for_backward(x.to(y.dtype), w, mask, proj, q, hess)  # autocast: x in y's dtype, as F.linear keeps it
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, mask, proj, q, hess = ctx.saved_tensors
        g2, x2 = g.flatten(0, -2), x.flatten(0, -2)  # (tokens, D), (tokens, C)
        with torch.autocast(g.device.type, enabled=False):  # fp32 (SPEC): autocast would run this product in bf16
            fisher = None if hess is None else g2.float().square().T @ x2.float().square()  # (D, C)
        if fisher is not None and not ctx.needs_input_grad[6]:
            hess.lerp_(fisher, 0.02)
        dx = g @ (w * proj.lerp(mask, q).to(w.dtype)).to(g.dtype)
        db = g2.sum(0) if ctx.needs_input_grad[5] else None
        return dx, g2.T @ x2, None, None, None, db, fisher.to(hess.dtype) if ctx.needs_input_grad[6] else None

class SparseLinear(nn.Module):
    """y = x (W * m_eff)^T + b, W's gradient straight-through (train.py masks it once finalize() froze m). With
    slorb = k, SLoRB (Eq. 1): y += (P x) B^T, P summing each k consecutive inputs, B (D, C/k) trained from 0."""
    def __init__(self, linear, pattern, score='hessian', slorb=0):
        super().__init__()
        D, C = linear.weight.shape
        self.weight, self.bias, self.pattern, self.k = linear.weight, linear.bias, pattern, slorb
        self.slorb = nn.Parameter(linear.weight.new_zeros(D, C // slorb)) if slorb else None  # B: the student = teacher
        self.collect, self.estimate = True, False  # set by train.py: input statistics, Fisher estimate this step
        new = lambda *shape: torch.empty(*shape, dtype=torch.float32, device=linear.weight.device)
        self.register_buffer('mask', new(D, C))  # m in [0, 1]
        self.register_buffer('proj', new(D, C))  # Proj(m), refreshed with m
        self.register_buffer('hess', new(D, C) if score == 'hessian' else None)  # EMA of the Fisher diagonal
        self.register_buffer('x_sq', new(C))  # EMA of x_j^2 (the wanda score; logged for every score)
        self.register_buffer('x', new(()))  # quench mix: m_eff = x m + (1 - x) Proj(m)
        self.reset()

    @torch.no_grad()
    def reset(self):  # the start: m = Proj(m) = 1 (the student is the dense teacher), no statistics yet
        for t, v in ((self.mask, 1), (self.proj, 1), (self.hess, 0), (self.x_sq, 0), (self.x, 1), (self.slorb, 0)):
            if t is not None:  # hess is None unless score == 'hessian', slorb unless k > 0
                t.fill_(v)

    def forward(self, x):
        if self.training and self.collect:  # running mean of x_j^2 for the wanda score, while the mask can change
            self.x_sq.lerp_(x.detach().float().pow(2).flatten(0, -2).mean(0), 0.02)
        hess = self.hess if self.estimate else None  # this step's backward updates the Fisher EMA
        y = MaskedLinear.apply(x, self.weight, self.mask, self.proj, self.x, self.bias, hess)
        return y if self.slorb is None else y + nn.functional.linear(x.unflatten(-1, (-1, self.k)).sum(-1), self.slorb)

def sparsify(model, pattern, score='hessian', slorb=0):
    """Swap every nn.Linear inside the decoder blocks for a SparseLinear; returns the list of them."""
    layers = []
    for name, child in list(model.transformer.h.named_modules()):
        if isinstance(child, nn.Linear):
            D, C = child.weight.shape
            rows, cols = (16, 16) if pattern == 'block16' else (1, int(pattern.split(':')[1]))  # one group's span
            if D % rows or C % cols or slorb and C % slorb:
                raise ValueError(f'transformer.h.{name}: weight {D}x{C} does not fit pattern {pattern} '
                                 f'(and SLoRB groups of {slorb}); pick another pattern or --slorb')
            layers.append(SparseLinear(child, pattern, score, slorb))
            model.transformer.h.set_submodule(name, layers[-1])
    return layers

# ------------------------------------------------------------------------ Hessian diagonal and the soft-mask update

def local(t):  # a DTensor (FSDP) -> this rank's rows; other tensors as they are
    return t.to_local() if hasattr(t, 'to_local') else t

def score(l, kind):
    """|W| sqrt(h), sqrt of OBD's saliency h W^2 / 2: h = 1 (magnitude), E[x_j^2] (wanda, the layer-local Hessian) or
    the Fisher diagonal over its row mean (hessian: a row's scale cancels in its groups but skews the layer's z)."""
    W = local(l.weight).detach().float().abs()
    if kind == 'hessian':
        h = local(l.hess)
        return W * (h / (h.mean(1, keepdim=True) + 1e-30)).sqrt()
    return W if kind == 'magnitude' else W * l.x_sq.sqrt()

@torch.no_grad()
def fisher_from_grad(layers):  # FSDP: this rank's rows of the step's Fisher estimate are hess's gradient (MaskedLinear)
    for l in layers:
        if l.hess is not None and l.hess.grad is not None:
            local(l.hess).lerp_(local(l.hess.grad), 0.02)
            l.hess.grad = None

@torch.no_grad()
def update(layers, kind, T, beta, lam, alpha=0.1):
    """One soft-mask step for every layer (Algorithm 1, lines 8-12); returns statistics for the log."""
    stats = dict(mid=0.0, dist=0.0, flips=0.0)
    n = sum(local(l.mask).numel() for l in layers)  # under FSDP the statistics are this rank's rows
    for l in layers:
        g, N = groups(score(l, kind), l.pattern)
        s = torch.stack([g.new_tensor(g.numel()), g.sum(), g.square().sum()]).double()
        if torch.distributed.is_initialized():  # the layer's moments over all ranks' rows (FSDP; DDP's agree)
            torch.distributed.all_reduce(s)
        mean, std = s[1] / s[0], (s[2] / s[0] - (s[1] / s[0]) ** 2).clamp(min=0).sqrt()
        z = (g - mean.float()) / (std.float() + 1e-6)  # layer-wise standardisation: T gets a fixed scale
        hard, order = topn(z, N)
        tau = z.gather(-1, order[:, N - 1:N + 1]).mean(-1, keepdim=True)  # between the N-th and (N+1)-th: N above 0.5
        G = (1 - beta) * torch.sigmoid((z - tau) / T) + beta * hard  # Eq. 3, then the structure blend
        mask, old = local(l.mask), local(l.proj)
        G, hard = ungroup(G, mask.shape, l.pattern), ungroup(hard, mask.shape, l.pattern)
        G = (G - lam * (mask - hard)).clamp(0, 1)  # mid penalty, Eq. 4
        mask.lerp_(G, alpha)  # Eq. 5
        proj = project(mask, l.pattern)
        for k, v in dict(flips=proj != old, mid=(mask > 0.05) & (mask < 0.95), dist=(mask - proj).abs()).items():
            stats[k] += v.sum().item() / n
        old.copy_(proj)
    return stats

@torch.no_grad()
def finalize(layers, optimizer=None):
    """m <- Proj(m), frozen; pruned W and Adam moments <- +0.0, kept there by train.py's dW * m (SPEC section 6)."""
    for l in layers:
        l.mask.copy_(l.proj)
        l.x.zero_()
        for t in [l.weight, *(optimizer.state.get(l.weight, {}) if optimizer else {}).values()]:  # W, Adam's moments
            if t.dim():  # not Adam's step
                t.masked_fill_(l.proj == 0, 0.0)

# ----------------------------------------------------------------------------------- one-shot baselines (SPEC 9)
# blocks are pruned in order, each calibrated on the outputs of the already-pruned blocks before it (Wanda, SparseGPT)

def sparsegpt(W, H, n, m, blocksize=128):
    """SparseGPT (Frantar & Alistarh 2023) for N:M: column-wise OBS with lazy batch updates. W (D, C),
    H = 2 X^T X / tokens (C, C). The pattern is picked on the already-updated weights; returns (W', mask)."""
    W, C = W.clone().float(), W.size(1)
    H += 0.01 * H.diagonal().mean() * torch.eye(C, device=W.device)  # dampening: positive definite, dead inputs too
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    keep = torch.ones_like(W)
    for i1 in range(0, C, blocksize):
        i2 = min(i1 + blocksize, C)
        W1, Hi, err = W[:, i1:i2], Hinv[i1:i2, i1:i2], torch.zeros_like(W[:, i1:i2])  # W1 a view: updates W
        for i in range(i2 - i1):
            if i % m == 0:  # OBS saliency w^2 / [H^-1]_jj^2 picks the M - N to prune in this group
                sal = W1[:, i:i + m] ** 2 / Hi.diagonal()[i:i + m] ** 2
                keep[:, i1 + i:i1 + i + m] = topn(sal, n)[0]
            q = W1[:, i] * keep[:, i1 + i]
            err[:, i] = (W1[:, i] - q) / Hi[i, i]
            W1[:, i:] -= err[:, i:i + 1] * Hi[i:i + 1, i:]  # re-fit the columns still to come
            W1[:, i] = q
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]
    return W * keep, keep

@torch.no_grad()
def one_shot(model, layers, method, calib):
    """Prune every SparseLinear once by score() or 'sparsegpt' (which re-fits W): mask = proj = the binary pattern."""
    x, rope = model.embed(calib)
    for block in model.transformer.h:
        xtx = {l: 0 for l in block.modules() if isinstance(l, SparseLinear)}  # running X^T X of each input
        def collect(l, inp, out):
            a = inp[0].flatten(0, 1).double()
            xtx[l] = xtx[l] + a.T @ a
        hooks = [l.register_forward_hook(collect) for l in xtx]
        block(x, rope, None, 0)
        for h in hooks:
            h.remove()
        for l in xtx:
            H = (2 * xtx[l] / calib.numel()).float()
            l.x_sq.copy_(H.diagonal() / 2)  # E[x_j^2]: the wanda score's
            if method == 'sparsegpt':  # N:M patterns only (train.py checks); it also re-fits the kept weights
                w, keep = sparsegpt(l.weight, H, *map(int, l.pattern.split(':')))
                l.weight.copy_(w)
            else:
                keep = project(score(l, method), l.pattern)
            l.mask.copy_(keep)
            l.proj.copy_(keep)
        x = block(x, rope, None, 0)  # the next block sees this block's pruned output

@torch.no_grad()
def merge(model):
    """Each SparseLinear -> an nn.Linear of W * m_eff (+0.0 where pruned) plus SLoRB's dense B P, as eval.py exports."""
    for name, l in list(model.named_modules()):
        if isinstance(l, SparseLinear):
            m = l.proj.lerp(l.mask, l.x)
            w = (l.weight * m).masked_fill(m == 0, 0.0).to(l.weight.dtype)
            w = w if l.slorb is None else w + l.slorb.repeat_interleave(l.k, 1)
            lin = nn.Linear(w.size(1), w.size(0), bias=False, device='meta')
            lin.weight, lin.bias = nn.Parameter(w), l.bias
            model.set_submodule(name, lin)

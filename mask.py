"""SparseForge's soft mask (paper sections 4.1-4.3) as a module swap: sparsify() swaps every decoder nn.Linear for a
SparseLinear; train.py calls update() every mask_interval steps (Algorithm 1, lines 8-13), then finalize() at hard_end.
Mask state is fp32 buffers of the layer (under FSDP, mask and proj are frozen Parameters sharded by rows with W)."""
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

def violations(w, pattern):
    """How many groups of the weight w (D, C) hold more nonzeros than the pattern allows: 0 if w is the pattern."""
    nonzero, n = groups((w != 0).float(), pattern)
    return int(((nonzero > 0).sum(-1) > n).sum())

class MaskedLinear(torch.autograd.Function):
    """y = x (W m_eff)^T + b with m_eff = lerp(proj, mask, q) (section 4.3) and the straight-through gradient
    dL/dW = dL/d(W m_eff) (Algorithm 1, line 6). The backward recomputes W m_eff rather than keep a (D, C) product."""
    @staticmethod
    def forward(ctx, x, w, mask, proj, q, b, hess):  # under autocast F.linear casts; the backward casts explicitly
        y = nn.functional.linear(x, w * proj.lerp(mask, q).to(w.dtype), b)
        ctx.save_for_backward(x.to(y.dtype), w, mask, proj, q, hess)  # autocast: x in y's dtype, as F.linear keeps it
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, mask, proj, q, hess = ctx.saved_tensors
        g2, x2 = g.flatten(0, -2), x.flatten(0, -2)  # (tokens, D), (tokens, C)
        dx = g @ (w * proj.lerp(mask, q).to(w.dtype)).to(g.dtype)
        db = g2.sum(0) if ctx.needs_input_grad[5] else None
        fisher = None
        if hess is not None:  # this micro-batch's Fisher diagonal sum_t (dL/dy_t)^2 x_t^2 (D, C), in fp32 always
            with torch.autocast(g.device.type, enabled=False):
                fisher = (g2.float().square().T @ x2.float().square()).to(hess.dtype)
        if fisher is not None and not ctx.needs_input_grad[6]:  # a buffer (one process, DDP): micro-steps add up
            hess.grad = fisher if hess.grad is None else hess.grad + fisher
            fisher = None
        return dx, g2.T @ x2, None, None, None, db, fisher  # FSDP: hess is a Parameter, the estimate its gradient

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
        self.register_buffer('x_sq', new(C) if score == 'wanda' else None)  # EMA of E[x_j^2] (the wanda score)
        self.register_buffer('x_sum', new(C) if score == 'wanda' else None, persistent=False)  # summed over the step
        self.register_buffer('x', new(()))  # quench mix: m_eff = x m + (1 - x) Proj(m)
        self.reset()

    @torch.no_grad()
    def reset(self):  # the start: m = Proj(m) = 1 (the student is the dense teacher), no statistics yet
        start = {'mask': 1, 'proj': 1, 'hess': 0, 'x_sq': 0, 'x_sum': 0, 'x': 1, 'slorb': 0}
        for name, v in start.items():
            if getattr(self, name) is not None:  # each score keeps only its own statistics; slorb only if k > 0
                getattr(self, name).fill_(v)

    def forward(self, x):
        if self.x_sum is not None and self.training and self.collect:  # E[x_j^2] of this micro-batch, summed
            self.x_sum += x.detach().float().pow(2).flatten(0, -2).mean(0)
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
def step_statistics(layers, micro_steps):
    """Advance the score's EMA once per step by the mean over the step's micro-batches on all ranks, whatever their
    number. Fisher: hess.grad sums this rank's (dL/dy)^2 x^2 with the loss / micro_steps, averaged over ranks (FSDP's
    reduce-scatter, DDP's all-reduce here): times micro_steps, the mean per micro-batch. Wanda: x_sum, see forward."""
    distributed = torch.distributed.is_initialized()
    for l in layers:
        if l.x_sum is not None and l.collect:
            if distributed:
                torch.distributed.all_reduce(l.x_sum, op=torch.distributed.ReduceOp.AVG)
            l.x_sq.lerp_(l.x_sum / micro_steps, 0.02)
            l.x_sum.zero_()
        if l.hess is not None and l.hess.grad is not None:
            if distributed and not isinstance(l.hess, nn.Parameter):
                torch.distributed.all_reduce(l.hess.grad, op=torch.distributed.ReduceOp.AVG)
            local(l.hess).lerp_(local(l.hess.grad) * micro_steps, 0.02)
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
    """m <- Proj(m), frozen (section 4.3); pruned W and Adam's moments <- +0.0, kept there by train.py's dW * m."""
    for l in layers:
        l.mask.copy_(l.proj)
        l.x.zero_()
        pruned = l.proj == 0
        l.weight.masked_fill_(pruned, 0.0)
        if optimizer is None:
            continue
        for t in optimizer.state.get(l.weight, {}).values():  # Adam's moments, and its step count (no dims)
            if t.dim():
                t.masked_fill_(pruned, 0.0)

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

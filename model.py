"""
The dense decoder: GPT-2 and the LLaMA family (LLaMA, Mistral, SmolLM2, Qwen2 q/k/v bias, Qwen3 q/k norm)
in one GPT class whose variant is chosen once, at construction, from the Hugging Face config.
Sparsity is not in here: mask.py swaps the decoder's nn.Linear layers for SparseLinear.
    model = GPT.from_pretrained('gpt2')                          # hub name, local dir, or
    model = GPT.from_pretrained(dir, gguf_file='x.gguf')         # a GGUF file (dequantised to fp32)
    model.export('out/hf')                                       # back to a standard HF checkpoint dir
"""
import math
import os
from dataclasses import dataclass, field, asdict
import torch
import torch.nn as nn
import torch.nn.functional as F

@dataclass
class GPTConfig:
    arch: str = 'gpt2'         # 'gpt2' (LayerNorm, learned positions, GELU) or 'llama' (RMSNorm, RoPE, SwiGLU)
    block_size: int = 1024     # context length
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 12        # < n_head: grouped-query attention
    n_embd: int = 768
    head_dim: int = 64
    n_inner: int = 3072        # MLP hidden width
    qkv_bias: bool = True      # GPT-2 and Qwen2 have q/k/v biases
    o_bias: bool = True        # bias of the attention output projection
    mlp_bias: bool = True
    qk_norm: bool = False      # Qwen3 RMS-normalises q and k per head
    tie: bool = True           # lm_head shares the token embedding
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    hf: dict = field(default_factory=dict)  # the HF config, kept for export

class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(n)), eps

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)

def norm(cfg, n):
    return nn.LayerNorm(n, eps=cfg.norm_eps) if cfg.arch == 'gpt2' else RMSNorm(n, cfg.norm_eps)

def rotate(x, cos, sin):
    # HF's rotate_half convention: the head dim is two halves, (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin

class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, (self.nh + 2 * self.nkv) * self.hd, bias=cfg.qkv_bias)  # q, k, v fused
        self.c_proj = nn.Linear(self.nh * self.hd, cfg.n_embd, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.norm_eps), RMSNorm(self.hd, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, rope, cache, pos):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q, k, v = (t.view(B, T, -1, self.hd).transpose(1, 2) for t in (q, k, v))  # (B, nh or nkv, T, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None:  # decode: write this step's k, v at pos, attend to everything so far
            cache[0][:, :, pos:pos + T], cache[1][:, :, pos:pos + T] = k, v
            k, v = cache[0][:, :, :pos + T], cache[1][:, :, :pos + T]
        # SDPA's fused kernels have no double backward: the Hutchinson pass (mask.py) runs this under
        # sdpa_kernel(SDPBackend.MATH), which is plain autograd ops and so twice differentiable
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.nkv != self.nh)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gated = cfg.arch == 'llama'  # SwiGLU: c_fc holds gate and up fused, [2 * n_inner, n_embd]
        self.c_fc = nn.Linear(cfg.n_embd, (2 if self.gated else 1) * cfg.n_inner, bias=cfg.mlp_bias)
        self.c_proj = nn.Linear(cfg.n_inner, cfg.n_embd, bias=cfg.mlp_bias)

    def forward(self, x):
        h = self.c_fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.c_proj(F.silu(gate) * up)
        return self.c_proj(F.gelu(h, approximate='tanh'))

class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = norm(cfg, cfg.n_embd), Attention(cfg), norm(cfg, cfg.n_embd), MLP(cfg)

    def forward(self, x, rope, cache, pos):
        x = x + self.attn(self.ln_1(x), rope, cache, pos)
        return x + self.mlp(self.ln_2(x))

class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=norm(cfg, cfg.n_embd)))
        if cfg.arch == 'gpt2':
            self.transformer.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie:
            self.lm_head.weight = self.transformer.wte.weight
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        self.register_buffer('inv_freq', inv_freq, persistent=False)

    def forward(self, idx, targets=None, cache=None, pos=0):
        """idx (B, T) token ids -> (logits (B, T, vocab), mean cross-entropy or None).
        cache: list of per-layer (k, v) tensors from new_cache(); pos: where idx starts in it."""
        B, T = idx.shape
        assert pos + T <= self.config.block_size, f'sequence of {pos + T} exceeds block_size {self.config.block_size}'
        x, rope = self.embed(idx, pos)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, None if cache is None else cache[i], pos)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def embed(self, idx, pos=0):
        """Token (+ position) embeddings and the RoPE (cos, sin) tables, each (T, hd), for blocks at pos.."""
        t = torch.arange(pos, pos + idx.size(1), device=idx.device)
        x = self.transformer.wte(idx)
        if self.config.arch == 'gpt2':
            return x + self.transformer.wpe(t), None
        freqs = torch.outer(t.float(), self.inv_freq).repeat(1, 2)  # both halves of a head share frequencies
        return x, (freqs.cos().to(x.dtype), freqs.sin().to(x.dtype))

    def new_cache(self, B, T, dtype, device):
        c = self.config
        return [(torch.zeros(B, c.n_kv_head, T, c.head_dim, dtype=dtype, device=device),
                 torch.zeros(B, c.n_kv_head, T, c.head_dim, dtype=dtype, device=device)) for _ in range(c.n_layer)]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        """Greedy decoding with a KV cache: one prefill of idx (B, T), then one token per step."""
        cache = self.new_cache(idx.size(0), idx.size(1) + max_new_tokens, self.lm_head.weight.dtype, idx.device)
        logits, _ = self(idx, cache=cache)
        for _ in range(max_new_tokens):
            idx = torch.cat((idx, logits[:, -1:].argmax(-1)), dim=1)
            logits, _ = self(idx[:, -1:], cache=cache, pos=idx.size(1) - 1)
        return idx

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_mfu(self, tokens_per_s, peak_flops):
        # 6N + 12 L H Q T flops per token (PaLM, arXiv 2204.02311, appendix B); 2:4 layers counted as dense
        c = self.config
        flops = 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size
        return flops * tokens_per_s / peak_flops

    # -----------------------------------------------------------------------------
    # Hugging Face weights, in and out

    @staticmethod
    def config_from_hf(hf):
        d = hf.to_dict()
        if d['model_type'] == 'gpt2':
            return GPTConfig('gpt2', d['n_positions'], d['vocab_size'], d['n_layer'], d['n_head'], d['n_head'],
                             d['n_embd'], d['n_embd'] // d['n_head'], d['n_inner'] or 4 * d['n_embd'],
                             norm_eps=d['layer_norm_epsilon'], hf=d)
        rope = d.get('rope_parameters') or {}  # transformers >= 5 nests rope_theta here
        if rope.get('rope_type', 'default') != 'default' or d.get('rope_scaling'):
            raise ValueError(f'{d["model_type"]}: rope scaling {rope or d["rope_scaling"]} is not implemented')
        nh, bias, qwen2 = d['num_attention_heads'], d.get('attention_bias', False), d['model_type'] == 'qwen2'
        return GPTConfig('llama', d['max_position_embeddings'], d['vocab_size'], d['num_hidden_layers'], nh,
                         n_kv_head=d.get('num_key_value_heads') or nh, n_embd=d['hidden_size'],
                         head_dim=d.get('head_dim') or d['hidden_size'] // nh, n_inner=d['intermediate_size'],
                         qkv_bias=qwen2 or bias, o_bias=bias and not qwen2, mlp_bias=d.get('mlp_bias', False),
                         qk_norm=d['model_type'] == 'qwen3', tie=d.get('tie_word_embeddings', False),
                         rope_theta=rope.get('rope_theta', d.get('rope_theta', 10000.0)), norm_eps=d['rms_norm_eps'], hf=d)

    def hf_names(self):
        """[(our key, [HF keys fused into it in order], transposed)] for every tensor of the model."""
        c = self.config
        if c.arch == 'gpt2':  # the same names as HF's GPT-2; its Conv1D stores weights as (in, out)
            return [(k, [k], k.endswith('.weight') and k.split('.')[-2] in ('c_attn', 'c_proj', 'c_fc'))
                    for k in self.state_dict() if not (c.tie and k == 'lm_head.weight')]
        names = [('transformer.wte.weight', ['model.embed_tokens.weight'], False),
                 ('transformer.ln_f.weight', ['model.norm.weight'], False)]
        if not c.tie:
            names.append(('lm_head.weight', ['lm_head.weight'], False))
        for i in range(c.n_layer):
            ours, hf = f'transformer.h.{i}.', f'model.layers.{i}.'
            pairs = [('ln_1.weight', ['input_layernorm.weight']), ('ln_2.weight', ['post_attention_layernorm.weight']),
                     ('attn.c_proj.weight', ['self_attn.o_proj.weight']), ('mlp.c_proj.weight', ['mlp.down_proj.weight']),
                     ('mlp.c_fc.weight', ['mlp.gate_proj.weight', 'mlp.up_proj.weight']),
                     ('attn.c_attn.weight', [f'self_attn.{p}_proj.weight' for p in 'qkv'])]
            pairs += [('attn.c_attn.bias', [f'self_attn.{p}_proj.bias' for p in 'qkv'])] * c.qkv_bias
            pairs += [('attn.c_proj.bias', ['self_attn.o_proj.bias'])] * c.o_bias
            pairs += [('mlp.c_fc.bias', ['mlp.gate_proj.bias', 'mlp.up_proj.bias']),
                      ('mlp.c_proj.bias', ['mlp.down_proj.bias'])] * c.mlp_bias
            pairs += [('attn.q_norm.weight', ['self_attn.q_norm.weight']),
                      ('attn.k_norm.weight', ['self_attn.k_norm.weight'])] * c.qk_norm
            names += [(ours + a, [hf + x for x in b], False) for a, b in pairs]
        return names

    @classmethod
    def from_pretrained(cls, name, gguf_file=None):
        from transformers import AutoModelForCausalLM  # lazy: only loading and export need it
        try:
            hf = AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf_file, dtype=torch.float32)
        except OSError as e:  # transformers' own message is a page long and never names the model
            raise OSError(f'cannot load model {name!r}: not a local HF directory or GGUF, and not on the hub '
                          f'(offline?); pass a local path, or gguf_file=') from e
        model = cls(cls.config_from_hf(hf.config))
        sd, hf_sd = model.state_dict(), hf.state_dict()
        names = model.hf_names()
        used = {k for _, ks, _ in names for k in ks}
        extra = [k for k in hf_sd if k not in used and not k.endswith(('rotary_emb.inv_freq', '.attn.bias', 'masked_bias'))
                 and not (model.config.tie and k == 'lm_head.weight')]
        assert not extra, f'{name}: HF tensors with no place in the model: {extra[:5]}'
        with torch.no_grad():
            for ours, keys, transposed in names:
                w = torch.cat([hf_sd[k].t() if transposed else hf_sd[k] for k in keys])
                assert w.shape == sd[ours].shape, f'{ours}: shape {tuple(w.shape)} from HF != {tuple(sd[ours].shape)}'
                sd[ours].copy_(w)
        return model

    def export(self, out_dir, tokenizer=None):
        """Write a standard HF checkpoint directory (config.json + model.safetensors) that
        transformers.AutoModelForCausalLM.from_pretrained loads with the same logits."""
        from transformers import AutoConfig
        from safetensors.torch import save_file
        sd = self.state_dict()
        out = {}
        for ours, keys, transposed in self.hf_names():
            w = sd[ours].detach().float()
            sizes = [self.config.n_head * self.config.head_dim] + [self.config.n_kv_head * self.config.head_dim] * 2 \
                if len(keys) == 3 else [w.size(0) // len(keys)] * len(keys)
            for k, part in zip(keys, w.split(sizes)):
                out[k] = (part.t() if transposed else part).contiguous()
        os.makedirs(out_dir, exist_ok=True)
        save_file(out, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
        hf = dict(self.config.hf)
        AutoConfig.for_model(**hf).save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)

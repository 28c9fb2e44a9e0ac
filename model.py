"""The dense decoder: GPT-2 and the LLaMA family (LLaMA, Mistral, SmolLM2, Qwen2 q/k/v bias, Qwen3 q/k norm) in one
GPT class whose variant is chosen once, from the Hugging Face config. Sparsity is mask.py's module swap.
    model = GPT.from_pretrained('gpt2')  # a hub name, a local HF dir, or (dir, gguf_file='x.gguf'), dequantised
    model.export('out/hf')               # back to a standard HF checkpoint dir"""
import os, re
from dataclasses import dataclass, field
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

# our module -> the HF LLaMA/Qwen modules fused into it (q, k, v stacked in c_attn; gate, up in c_fc)
LLAMA_NAMES = {'transformer.wte': ['model.embed_tokens'], 'transformer.ln_f': ['model.norm'], 'lm_head': ['lm_head'],
               'ln_1': ['input_layernorm'], 'ln_2': ['post_attention_layernorm'], 'attn.c_proj': ['self_attn.o_proj'],
               'attn.c_attn': ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'],
               'attn.q_norm': ['self_attn.q_norm'], 'attn.k_norm': ['self_attn.k_norm'],
               'mlp.c_fc': ['mlp.gate_proj', 'mlp.up_proj'], 'mlp.c_proj': ['mlp.down_proj']}

def norm(cfg, n):
    return nn.LayerNorm(n, eps=cfg.norm_eps) if cfg.arch == 'gpt2' else nn.RMSNorm(n, eps=cfg.norm_eps)

def rotate(x, cos, sin):
    # HF's rotate_half convention: the head dim is two halves, (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin

class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.hd, self.sizes = cfg.head_dim, [cfg.n_head * cfg.head_dim] + [cfg.n_kv_head * cfg.head_dim] * 2  # q, k, v
        self.c_attn = nn.Linear(cfg.n_embd, sum(self.sizes), bias=cfg.qkv_bias)  # q, k, v fused
        self.c_proj = nn.Linear(self.sizes[0], cfg.n_embd, bias=cfg.o_bias)
        self.q_norm, self.k_norm = (nn.RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else nn.Identity() for _ in 'qk')
    def forward(self, x, rope):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.sizes, dim=-1)
        q, k, v = (t.view(B, T, -1, self.hd).transpose(1, 2) for t in (q, k, v))  # (B, nh or nkv, T, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.sizes[1] != self.sizes[0])
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gated = cfg.arch == 'llama'  # SwiGLU: c_fc holds gate and up fused, [2 * n_inner, n_embd]
        self.c_fc = nn.Linear(cfg.n_embd, (2 if self.gated else 1) * cfg.n_inner, bias=cfg.mlp_bias)
        self.c_proj = nn.Linear(cfg.n_inner, cfg.n_embd, bias=cfg.mlp_bias)
    def forward(self, x):
        if self.gated:
            gate, up = self.c_fc(x).chunk(2, dim=-1)
            return self.c_proj(F.silu(gate) * up)
        return self.c_proj(F.gelu(self.c_fc(x), approximate='tanh'))

class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = norm(cfg, cfg.n_embd), Attention(cfg)
        self.ln_2, self.mlp = norm(cfg, cfg.n_embd), MLP(cfg)
    def forward(self, x, rope):
        x = x + self.attn(self.ln_1(x), rope)
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

    def forward(self, idx, targets=None):
        """idx (B, T) -> (logits (B, T, vocab), mean cross-entropy over targets (B, T), or None)."""
        assert idx.size(1) <= self.config.block_size, f'{idx.size(1)} tokens exceed the context'
        x, rope = self.embed(idx)
        for block in self.transformer.h:
            x = block(x, rope)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def embed(self, idx):
        """Token (+ position) embeddings (B, T, C), and the RoPE (cos, sin) tables, each (T, hd), or None."""
        t = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.wte(idx)
        if self.config.arch == 'gpt2':
            return x + self.transformer.wpe(t), None
        hd = self.config.head_dim  # no buffer: a model built on the meta device (FSDP) needs nothing re-initialised
        inv_freq = 1.0 / self.config.rope_theta ** (torch.arange(0, hd, 2, device=idx.device).float() / hd)
        freqs = torch.outer(t.float(), inv_freq).repeat(1, 2)  # both halves of a head share frequencies
        return x, (freqs.cos().to(x.dtype), freqs.sin().to(x.dtype))

    # ---------------------------------------------------------------------------- Hugging Face weights, in and out

    @staticmethod
    def config_from_hf(hf):
        d = {k: v for k, v in hf.to_dict().items() if k != 'quantization_config'}  # export writes plain fp32
        if d['model_type'] == 'gpt2':
            return GPTConfig(arch='gpt2', block_size=d['n_positions'], vocab_size=d['vocab_size'],
                             n_layer=d['n_layer'], n_head=d['n_head'], n_kv_head=d['n_head'], n_embd=d['n_embd'],
                             head_dim=d['n_embd'] // d['n_head'], n_inner=d['n_inner'] or 4 * d['n_embd'],
                             norm_eps=d['layer_norm_epsilon'], hf=d)
        rope = d.get('rope_parameters') or {}  # transformers >= 5 nests rope_theta here
        if rope.get('rope_type', 'default') != 'default' or d.get('rope_scaling'):
            raise ValueError(f'{d["model_type"]}: rope scaling {rope or d["rope_scaling"]} is not implemented')
        nh, bias, qwen2 = d['num_attention_heads'], d.get('attention_bias', False), d['model_type'] == 'qwen2'
        return GPTConfig(arch='llama', block_size=d['max_position_embeddings'], vocab_size=d['vocab_size'],
                         n_layer=d['num_hidden_layers'], n_head=nh, n_kv_head=d.get('num_key_value_heads') or nh,
                         n_embd=d['hidden_size'], head_dim=d.get('head_dim') or d['hidden_size'] // nh,
                         n_inner=d['intermediate_size'],
                         qkv_bias=qwen2 or bias, o_bias=bias and not qwen2, mlp_bias=d.get('mlp_bias', False),
                         qk_norm=d['model_type'] == 'qwen3', tie=d.get('tie_word_embeddings', False),
                         rope_theta=rope.get('rope_theta', d.get('rope_theta', 1e4)), norm_eps=d['rms_norm_eps'],
                         hf=d)

    def hf_names(self):
        """(our name, [HF names fused into it, in order], transposed) for every parameter."""
        for k, _ in self.named_parameters():  # a tied lm_head.weight is transformer.wte.weight, named once
            mod, p = k.rsplit('.', 1)
            if self.config.arch == 'gpt2':  # HF's GPT-2 names; its Conv1D stores weights as (in, out)
                yield k, [k], p == 'weight' and mod.split('.')[-1] in ('c_attn', 'c_proj', 'c_fc')
                continue
            block = re.match(r'transformer\.h\.(\d+)\.(.*)', mod)
            hf = [f'model.layers.{block[1]}.{m}' for m in LLAMA_NAMES[block[2]]] if block else LLAMA_NAMES[mod]
            yield k, [f'{m}.{p}' for m in hf], False

    @classmethod
    def from_pretrained(cls, name, gguf_file=None):
        from transformers import AutoModelForCausalLM  # lazy: only loading and export need it
        try:
            hf = AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf_file, dtype=torch.float32)
        except OSError:  # transformers' own message is a page long and never names the model
            raise SystemExit(f'cannot load model {name!r}: not a local HF directory or GGUF, and not on the hub '
                             f'(offline?); pass a local path, or gguf_file=') from None
        with torch.device('meta'):  # no memory and no random init: each parameter gets HF's values below
            model = cls(cls.config_from_hf(hf.config))
        hf_sd = hf.state_dict()
        del hf  # hf_sd alone holds HF's tensors now, each freed once used: one model in memory, not two
        for ours, keys, transposed in model.hf_names():
            w = torch.cat([hf_sd.pop(k).t() if transposed else hf_sd.pop(k) for k in keys])
            assert w.shape == model.get_parameter(ours).shape, f'{ours}: shape {tuple(w.shape)} from HF is not ours'
            torch.utils.swap_tensors(model.get_parameter(ours), nn.Parameter(w))  # in place: a tied lm_head follows
        extra = [k for k in hf_sd if not k.endswith(('inv_freq', '.attn.bias', 'masked_bias', 'lm_head.weight'))]
        assert not extra, f'{name}: HF tensors with no place in the model: {extra[:5]}'  # lm_head: left when tied
        return model

    def export(self, out_dir):
        """Write a standard HF checkpoint dir (config.json, model.safetensors): AutoModelForCausalLM's same logits."""
        from transformers import AutoConfig
        from safetensors.torch import save_file
        sd, out = self.state_dict(), {}
        for ours, keys, transposed in self.hf_names():
            w = (sd[ours].t() if transposed else sd[ours]).detach().float()
            sizes = self.transformer.h[0].attn.sizes if len(keys) == 3 else [w.size(0) // len(keys)] * len(keys)
            out |= {k: part.contiguous() for k, part in zip(keys, w.split(sizes))}
        AutoConfig.for_model(**self.config.hf).save_pretrained(out_dir)  # it makes the directory
        save_file(out, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})

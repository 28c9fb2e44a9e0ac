"""Logits parity with transformers for every architecture model.py claims, and the export round trip."""
import pytest
import torch
import transformers
from model import GPT
from conftest import smollm2

def tiny(kind):
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64)
    if kind == 'gpt2':
        return transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    if kind == 'llama':  # GQA + tied embeddings, a non-default rope theta
        return transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=5e4, **common)
    if kind == 'qwen2':  # q/k/v biases only
        return transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common)
    return transformers.Qwen3Config(num_key_value_heads=2, head_dim=32, **common)  # q/k norm, head_dim != C / nh

@pytest.mark.parametrize('kind', ['gpt2', 'llama', 'qwen2', 'qwen3'])
def test_hf_parity_and_round_trip(kind, tmp_path):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(tiny(kind)).eval()
    for p in hf.parameters():  # random biases and norms too, so a dropped one shows
        p.data.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / 'hf')
    model = GPT.from_pretrained(str(tmp_path / 'hf')).eval()
    idx = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        ref = hf(idx).logits
        logits, _ = model(idx)
        assert (logits - ref).abs().max() < 1e-4
        model.export(tmp_path / 'out')
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'out').eval()
        assert (back(idx).logits - ref).abs().max() < 1e-4

def test_smollm2_parity():
    d, f = smollm2()
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = GPT.from_pretrained(d, gguf_file=f).eval()
    assert model.config.n_kv_head == 3 and model.config.tie and sum(p.numel() for p in model.parameters()) == 134_515_008
    idx = torch.tensor([tok('The quick brown fox jumps over the lazy dog.')['input_ids']])
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max() < 1e-4

def test_unknown_model_offline():
    with pytest.raises(SystemExit, match="cannot load model 'sparseforge/not-a-model'"):
        GPT.from_pretrained('sparseforge/not-a-model')

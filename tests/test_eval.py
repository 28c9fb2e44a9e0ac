"""Export of a finalised sparse model as a standard HF checkpoint, the pattern validator on it, and lm-eval
zero-shot in process on a small local multiple-choice task (offline)."""
import json
import torch
import transformers
import mask as sf
from conftest import smollm2
from eval import check_pattern, load, zero_shot
from model import GPT

def test_export_finalised_2_4(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / 'dense')
    model = GPT.from_pretrained(str(tmp_path / 'dense'))
    layers = sf.sparsify(model, '2:4')
    layers[0].weight.data[0, :4] = torch.tensor([-1.0, -2.0, -3.0, -4.0])  # negative weights pruned must give +0.0
    sf.set_mask(layers, [sf.project(l.weight.detach().abs(), '2:4') for l in layers])
    sf.finalize(layers)
    idx = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        ref = model(idx)[0]
    sf.merge(model)
    model.export(tmp_path / 'sparse')
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'sparse').eval()
    with torch.no_grad():
        assert (hf(idx).logits - ref).abs().max() < 1e-5
    back, _ = load(str(tmp_path / 'sparse'))
    assert set(check_pattern(back, '2:4').values()) == {0}
    w = hf.model.layers[0].self_attn.q_proj.weight
    assert (w == 0).float().mean() == 0.5 and not torch.signbit(w[w == 0]).any()

def test_zero_shot_local_task(tmp_path):
    from lm_eval.tasks import TaskManager
    d, f = smollm2()
    docs = [("The capital of France is", ["Paris", "banana", "seven"]), ("Two plus two equals", ["four", "purple", "Tuesday"]),
            ("The opposite of hot is", ["cold", "table", "run"]), ("A dog is a kind of", ["animal", "number", "color"])]
    (tmp_path / 'mc.jsonl').write_text(''.join(json.dumps(dict(question=q, choices=c, answer=0)) + '\n' for q, c in docs))
    (tmp_path / 'mc.yaml').write_text(f'''task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
''')
    GPT.from_pretrained(d, gguf_file=f).export(tmp_path / 'hf', transformers.AutoTokenizer.from_pretrained(d, gguf_file=f))
    res = zero_shot(str(tmp_path / 'hf'), ['tiny_mc'], task_manager=TaskManager(include_path=str(tmp_path)))
    assert res == {'tiny_mc': (1.0, 1.0)}  # the dense SmolLM2 gets these four right

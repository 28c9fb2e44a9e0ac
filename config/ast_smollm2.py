# AST (Adaptive Sparse Trainer, the retraining method SparseForge compares with) on SmolLM2-135M-Instruct, pydoc, 2:4,
# through the same loop and budget as the default (config/smollm2_24.py): the mask is the hard magnitude top-2 of every
# group of 4 from the first step, re-selected every 10 steps (AST section 3.2 and its Algorithm 1; m_eff = m, no gate,
# no quench), pruned weights decay by Annealing SR-STE (AST Eq. 2-3), and the dense model teaches (KD).
# Hardware: any CPU, offline; an iteration costs about what the default's does (10-12 s on an idle 2-core VM).
#   python prepare.py pydoc --model=smollm2
#   python train.py config/ast_smollm2.py
init_from = 'smollm2'
dataset = 'pydoc'
out_dir = 'out-ast'
method = 'ast'
pattern = '2:4'
score = 'magnitude'  # AST's criterion
mask_interval = 10  # AST's Delta t
mask_start = 0.0  # from the first step
srste_decay = 30.0  # each step multiplies a pruned weight by 1 - lr * 30 at the cap (0.976 at the peak lr)
srste_ramp = 0.5  # the cap from half the run on (AST's T_0)
batch_size = 4
block_size = 256
max_iters = 64  # 4 * 256 = 1,024 tokens per iteration, 65,536 tokens in all
learning_rate = 8e-4  # the default's
min_lr = 8e-5

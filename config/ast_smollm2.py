# AST-style retraining (the paper's main baseline) through the same loop: a hard magnitude 2:4 mask from the
# first step, re-selected every 10 steps, KD on, SR-STE decay; same model, data and budget as smollm2_24.py.
# Hardware: CPU, about 8 minutes on 2 cores; val ppl 32.61 (bench/tokens.py, one thread; SparseForge: 12.20).
#   python train.py config/ast_smollm2.py
method = 'ast'
score = 'magnitude'
alpha = 1.0       # the mask is the hard target itself
mid_penalty = 0.0
mask_interval = 10
mask_start = 0.0
hard_start, hard_end = 0.0, 1.0  # the mask is binary throughout; frozen at the end
srste_decay = 1e-4
max_iters = 64

# SparseForge 2:4 on LLaMA-2-7B, context 4096, the paper's 5B-token budget.
# Hardware: 8 GPUs of 80 GB; about 50 GPU-hours in the paper (L20A). NOT RUNNABLE YET: under DDP every GPU holds the
# student, its AdamW state, the teacher and the fp32 mask/projection/Hessian buffers (~200 GB for 7B); it needs
# sharding (FSDP over parameters and mask buffers), which this repo does not have yet.
# Data: the paper used Dolmino-mix-1124; C4 is what prepare.py offers.
#   python prepare.py c4 --model=meta-llama/Llama-2-7b-hf --tokens=5100000000
#   torchrun --standalone --nproc_per_node=8 train.py config/llama2_7b.py
# Tokens: 2 sequences * 4096 * 32 accumulation steps = 262,144 per iteration; 19,073 iterations = 5.0B.
init_from = 'meta-llama/Llama-2-7b-hf'
dataset = 'c4'
out_dir = 'out-llama2-7b'
batch_size = 2
block_size = 4096
gradient_accumulation_steps = 4 * 8
max_iters = 19073
learning_rate = 2e-5
min_lr = 2e-6
warmup = 0.01  # about 200 iterations
eval_interval = 1000
eval_tokens = 1_000_000
log_interval = 20
baselines = False

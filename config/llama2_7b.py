# SparseForge 2:4 on LLaMA-2-7B, context 4096, the paper's 5B-token budget, FSDP over 8 GPUs of 80 GB. Not yet run on
# GPUs; memory per rank from the formulas in RESULTS.md (Memory), with the activations measured on a 7B-shaped block
# (bench/memory.py). GPU: 29.8 GB sharded state (fp32 student, grads, AdamW, mask, Proj(m), Fisher EMA
# and estimate, teacher: 1/8 each) + 3.2 GB gathered blocks + 1 GB gathered root (bf16) + 28.9 GB activations at
# 1 x 4096 tokens + ~3 GB logits and loss = ~66 GB of 80. Host: rank 0 reads the weights (one fp32 copy, 27 GB) and
# broadcasts them, each rank keeps its rows; every rank saves its own shards (DCP), nothing is gathered. So: 8 x 80 GB
# GPUs and >= 64 GB of host memory. The paper reports about 50 GPU-hours (L20A).
# Data: the paper used Dolmino-mix-1124; C4 is what prepare.py offers.
#   python prepare.py c4 --model=meta-llama/Llama-2-7b-hf --tokens=5100000000
#   torchrun --standalone --nproc_per_node=8 train.py config/llama2_7b.py
# Tokens: 1 sequence * 4096 * 64 accumulation steps = 262,144 per iteration; 19,073 iterations = 5.0B.
# Then: python prepare.py wikitext2 --model=meta-llama/Llama-2-7b-hf
#   python eval.py out-llama2-7b --data=data/wikitext2_llama-2-7b-hf/test.bin --block_size=4096
init_from = 'meta-llama/Llama-2-7b-hf'
dataset = 'c4'
out_dir = 'out-llama2-7b'
fsdp = True
mask_init = 'dense'  # the paper's start, m = 1
batch_size = 1
block_size = 4096
gradient_accumulation_steps = 8 * 8  # divided by the 8 ranks
max_iters = 19073
learning_rate = 2e-5
min_lr = 2e-6
warmup = 0.01  # about 200 iterations
eval_interval = 1000
eval_tokens = 1_000_000
log_interval = 20
hard_end = 0.85  # the paper's windows: at 20k steps the last 15% suffice to fine-tune under the frozen mask

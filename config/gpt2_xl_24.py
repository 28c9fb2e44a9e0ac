# SparseForge 2:4 on GPT-2 XL (1.5B) with C4, the paper's 1.25B-token budget.
# Hardware: 8 GPUs of 80 GB (A100/H100), DDP; roughly a day (an estimate: not yet run on GPUs).
#   python prepare.py c4 --model=openai-community/gpt2-xl --tokens=1300000000
#   torchrun --standalone --nproc_per_node=8 train.py config/gpt2_xl_24.py
# Tokens: 8 sequences * 1024 * 8 accumulation steps = 65,536 per iteration; 19,073 iterations = 1.25B.
# Then: python prepare.py wikitext2 --model=gpt2 && python eval.py out-gpt2-xl --data=data/wikitext2_gpt2/test.bin
#   (published WikiText-2 2:4 perplexity: SparseGPT 21.14, AST 18.33)
init_from = 'openai-community/gpt2-xl'
dataset = 'c4'
out_dir = 'out-gpt2-xl'
batch_size = 8
block_size = 1024
gradient_accumulation_steps = 8 * 8  # divided by the 8 ranks
max_iters = 19073
learning_rate = 5e-5
min_lr = 5e-6
warmup = 0.01  # about 200 iterations
eval_interval = 1000
eval_tokens = 1_000_000
log_interval = 20
hess_interval = 10
mask_interval = 10
hard_end = 0.85  # the paper's windows: at 20k steps the last 15% suffice to fine-tune under the frozen mask

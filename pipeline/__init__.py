"""distillery's machine-learning half, in plain PyTorch (never Prefect)."""

import os

# MKL's conditional numerical reproducibility: without it, sgemm may take different code
# paths by thread count and memory alignment, so the same student trained twice in a busy
# process (parallel sweep threads) can differ in the last bits and then in accuracy.
# Read at MKL's first call, so this works even when torch is already imported.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

"""Extend a pretrained TTT-E2E model to long context (paper: Books at 32K or 128K).

    python pipelines/extend_context.py --init-from <pretrain checkpoint> --data s3://bucket/books \
        --seq-len 131072 --storage s3://bucket/runs

Parameters only from the checkpoint (fresh optimizer, schedule and data position), eta = 1 from the
start (no ramp), k = 8K and b = 1K unchanged, peak lr 4e-4: recipes/3b_extend_32k.yaml (T = 32K);
`--config 3b_extend_128k` for the paper's 128K run; every flag overrides the recipe.
"""

from ttte2e.platform.cli.train import run_main

if __name__ == "__main__":
    run_main(__doc__.splitlines()[0], recipe="3b_extend_32k", require_init=True)

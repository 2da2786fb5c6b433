"""Extend a pretrained TTT-E2E model to long context (paper: Books at 32K or 128K).

    python pipelines/extend_context.py --init-from <pretrain checkpoint> --data s3://bucket/books \
        --seq-len 131072 --storage s3://bucket/runs

Parameters only from the checkpoint (fresh optimizer, schedule and data position), eta = 1 from the
start (no ramp), k = 8K and b = 1K unchanged, peak lr 4e-4; --seq-len 32768 by default.
"""

from ttte2e.platform.cli.train import run_main

DEFAULTS = dict(preset="3B", lr=4e-4, eta_ramp=False, tokens=5_000_000_000)
MODEL_DEFAULTS = dict(seq_len=32768)

if __name__ == "__main__":
    run_main(__doc__.splitlines()[0], DEFAULTS, MODEL_DEFAULTS, require_init=True)

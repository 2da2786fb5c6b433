"""Pretrain TTT-E2E (the paper's 3B recipe by default) on Ray Train + DeepSpeed ZeRO.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python pipelines/pretrain_3b.py --data s3://bucket/dclm --storage s3://bucket/runs
    python pipelines/pretrain_3b.py --plan --nodes 8 --gpus-per-node 8      # capacity plan only
    python pipelines/pretrain_3b.py --preset tiny --data runs/demo/data ...  # same path, on a CPU

Recipe: T = k = 8K, b = 1K, 1/4 TTT blocks, 1M-token batches, AdamW(0.9, 0.95, wd 0.1),
peak lr 8e-4, 10% warm-up then cosine to 1e-5, clip 1.0, eta ramp 0.1 -> 1 over the warm-up,
54B tokens (1x Chinchilla; --tokens 164000000000 for the paper's headline budget).
"""

from ttte2e.platform.cli.train import run_main

DEFAULTS = dict(preset="3B", lr=8e-4, min_lr=1e-5, batch_tokens=1 << 20, tokens=54_000_000_000,
                eta_ramp=True)

if __name__ == "__main__":
    run_main(__doc__.splitlines()[0], DEFAULTS)

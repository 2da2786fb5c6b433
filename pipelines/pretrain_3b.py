"""Pretrain TTT-E2E (the paper's 3B recipe by default) on Ray Train + DeepSpeed ZeRO.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python pipelines/pretrain_3b.py --data s3://bucket/dclm --storage s3://bucket/runs
    python pipelines/pretrain_3b.py --plan --nodes 8 --gpus-per-node 8      # capacity plan only
    python pipelines/pretrain_3b.py --preset tiny --data runs/demo/data ...  # same path, on a CPU
    python pipelines/pretrain_3b.py --local ...   # the same loop in this process, without Ray

The settings are recipes/3b_pretrain_8k.yaml (the paper's 3B recipe); every flag overrides
them, and `--config FILE` starts from another recipe.
"""

from ttte2e.platform.cli.train import run_main

if __name__ == "__main__":
    run_main(__doc__.splitlines()[0], recipe="3b_pretrain_8k")

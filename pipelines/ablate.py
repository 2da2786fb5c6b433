"""Ablations of the paper's Figure 4 with Ray Tune: sliding-window size k, TTT mini-batch size b and
the number of blocks with TTT, TTT-E2E against the SWA baseline; every trial a training run.

    python pipelines/ablate.py --preset tiny --data runs/demo/data --grid window --steps 120 \
        --batch-tokens 1024 --storage runs/ablate --name tiny-window [--scheduler asha]
    ray job submit --working-dir . -- python pipelines/ablate.py --data s3://bucket/books \
        --storage s3://bucket/ablations --workers 8 --grid all
Rerun with the same --name to resume an interrupted sweep. Output: ablation.csv / .md and
ablation_<knob>.png in <storage>/<name>/, logged to the sweep's MLflow run.
"""

from ttte2e.platform.cli.sweep import main

# The base config of every trial: the paper's ablation setting (760M, 1x Chinchilla per trial).
if __name__ == "__main__":
    main(__doc__.splitlines()[0], recipe="760m_ablation")

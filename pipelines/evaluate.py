"""Evaluate a trained TTT-E2E model: loss vs context length (TTT-E2E, SWA without TTT and full
attention from the same weights) and single-needle-in-a-haystack accuracy.

    python pipelines/evaluate.py --model runs/demo/runs/<run>/checkpoint_00000240 \
        --data runs/demo/data --contexts 512,1024,2048 --out runs/eval [--niah]
    python pipelines/evaluate.py --model models:/ttt-e2e-3b@champion --data s3://bucket/books ...
"""

from ttte2e.platform.cli.evaluate import main

if __name__ == "__main__":
    main()

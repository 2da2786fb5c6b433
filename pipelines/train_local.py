"""Meta-train a TTT-E2E preset in this process on the demo corpus (the README's main job).

    python pipelines/train_local.py [--preset tiny] [--steps 120] [--out-dir runs/demo] ...
"""

from ttte2e.platform.local_train import parse_args, train

if __name__ == "__main__":
    train(parse_args())

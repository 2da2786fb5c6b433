"""Ray Tune ablation sweeps (sweep): every trial is a training run of train/driver.py."""

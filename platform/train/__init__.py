"""Training: the run's configuration and pre-flight (config), the Ray Train driver (driver), the
per-worker loop (worker), the checkpoint format (checkpoint), the capacity plan (plan)."""

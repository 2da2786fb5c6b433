"""Ray runtime: joining or starting Ray (ray_runtime), a private local head (local_head), the
README's end-to-end demo job (demo_job)."""

"""Serve a TTT-E2E model with an OpenAI-compatible HTTP API (Ray Serve); conversations keep their
fast weights between turns (send an X-Session-Id header). Runs until Ctrl-C / SIGTERM.

    python pipelines/serve.py runs/demo/model --port 8000
    python pipelines/serve.py models:/tiny@champion --tracking-uri sqlite:///runs/demo/mlflow.db
    python pipelines/serve.py s3://bucket/models/3b --address auto --replicas 8 \
        --gpus-per-replica 1 --session-storage s3://bucket/sessions

Then any OpenAI client: base_url http://127.0.0.1:8000/v1 (docs/serving.md).
"""

from ttte2e.platform.cli.serve import main

if __name__ == "__main__":
    main()

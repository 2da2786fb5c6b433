"""The model registry: register a checkpoint, move aliases, list versions.

    python pipelines/registry.py register runs/<run>/checkpoint_00000240 --name tiny [--alias candidate]
    python pipelines/registry.py promote tiny @candidate --to champion
    python pipelines/registry.py list tiny
(--tracking-uri or MLFLOW_TRACKING_URI names the registry.)
"""

from ttte2e.platform.cli.registry import registry_main

if __name__ == "__main__":
    registry_main()

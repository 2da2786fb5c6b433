"""Import a checkpoint released by the TTT-E2E authors (official orbax format) without JAX:
writes our model folder (config.json + safetensors, sharded above --max-shard-gb).

    python pipelines/import_official.py --checkpoint /mirror/125m-dclm-8k --preset 125m --out models/125m
    python pipelines/import_official.py --checkpoint s3://bucket/ttt-e2e/3b-books-128k --preset auto \
        --set seq_len=131072 --out models/3b-128k --register ttt-e2e-3b

Local paths, s3:// (TTTE2E_S3_ENDPOINT / AWS_* as elsewhere) and gs:// (tensorstore's GCS
driver; TTTE2E_GCS_USER_PROJECT for Requester Pays buckets) are read directly.
"""

from ttte2e.platform.cli.import_official import main

if __name__ == "__main__":
    main()

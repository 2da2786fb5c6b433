"""Raw text (jsonl / jsonl.gz / jsonl.zst / parquet / .txt folders; local or s3://) -> tokenized
parquet shards + manifest.json, tokenized in Ray Data.

    python pipelines/prepare_data.py --input <path|s3://...> --output <path|s3://...> \
        --tokenizer <tokenizer.json|s3://...|train:<vocab>> [--min-tokens 8192] [--val-fraction 0.01]
    python pipelines/prepare_data.py --verify <output>     # sizes + checksums, exit 1 on damage
"""

from ttte2e.platform.cli.prepare import main

if __name__ == "__main__":
    main()

"""Data: raw text -> token shards + manifest (prepare), the dataset format (manifest), shards ->
shuffled training windows (stream), local/S3 locations (storage), the demo corpus."""

from ttte2e.platform.data.stream import StreamSpec, iter_batches

__all__ = ["StreamSpec", "iter_batches"]

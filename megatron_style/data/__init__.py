"""Data: shards, streams, tokenizers, masking, the demo generator, and packing into batches."""

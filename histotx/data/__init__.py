"""Streaming training data: shards → co-registered multi-crop views → masked, packed batches."""

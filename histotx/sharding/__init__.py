"""The offline sharding stage: whole-slide images + spatial transcriptomics → WebDataset shards."""

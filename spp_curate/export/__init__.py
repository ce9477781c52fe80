"""Writing releases: Parquet and WebDataset shards, the dataset card, the manifest."""

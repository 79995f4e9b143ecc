"""Running the work: Dask clusters from config, the shard task, the Lightning module, trainer and writer, DDP."""

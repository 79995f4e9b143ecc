"""One module per stage; each exposes ``run(cfg, run_dir, client=None)``."""

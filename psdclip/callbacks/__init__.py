"""Lightning callbacks (evaluation, checkpointing, data quality, non-finite losses, throughput, progress, media) and
the Hydra callback that writes run summaries; every `_target_` in `conf/callbacks/` points here."""

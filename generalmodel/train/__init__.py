"""Training: the Ray-free per-worker loop (`loop`), how a model is prepared for it (`parallelize`),
checkpoints (`checkpoint`), fp8 (`fp8`), MFU (`mfu`), and the loop under Ray Train (`ray_trainer`)."""

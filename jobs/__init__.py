"""The user-facing jobs, one module each, each with an importable `main(cfg)`:

    python -m jobs.pretrain --config configs/llama-tiny.yaml      # or: gm pretrain ...
    python jobs/pretrain.py ...                                   # what `ray job submit` runs

Every job takes the same command line (generalmodel.cli): `--config PRESET.yaml`,
`--section.key=value` overrides, `--print-config`, `--help`.
"""

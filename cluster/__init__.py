"""testbench shared core: config, schemas, stores, lm-eval adapter, bootstrap, CLI."""

__version__ = "0.1.0"

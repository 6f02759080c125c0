"""The domain of a batch: job and run records, prices, budget, storage, report, CLI."""

"""mvtrain: the training stage (streams mvkit shards into budgeted batches)."""

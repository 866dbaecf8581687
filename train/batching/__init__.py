"""Which samples train together: bucketer (micro-batches under the token and patch budgets),
schedule (the epoch's micro-batches per rank, a pure function of index, seed and epoch)."""

"""The model side: loading (checkpoint folders), tiny (the test model), setup (dtype, LoRA,
frozen vision, checkpointing), attention (batched varlen vision attention), adapters (what
each family's forward takes, and its loss)."""

"""From a shard sample to model inputs: tokenize (text and labels), pixels (slices as
patches), lengths (exact token counts for planning), loader (planned micro-batches read by
key and collated)."""

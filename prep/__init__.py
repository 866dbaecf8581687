"""mvprep: the offline stage (decode once, lay out, write annotated WebDataset shards)."""

"""mvshards: the contract between mvprep and mvtrain.

Slice-layout arithmetic, model profiles and families, the cost model, the sample schema,
the shard writer and reader, and the index with its per-image table. Pure Python plus the
standard library; nothing here imports torch.
"""

__version__ = "0.1.0"

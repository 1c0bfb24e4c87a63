"""momrec shards: public recommendation datasets -> WebDataset shards of raw text and images -> training batches."""

__version__ = "0.1.0"

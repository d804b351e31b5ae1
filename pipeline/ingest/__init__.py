"""Getting records into a store: WebDataset shards, image decoding, backbones, precomputed embeddings, demo world."""

__all__: list[str] = []

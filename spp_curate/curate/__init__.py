"""Reading sources, indexing images and embedding them."""

"""``POST /v1/embeddings``: the request, the model's sentence-transformers description, the route."""

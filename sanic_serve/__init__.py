"""The HTTP side of hfserve: OpenAI protocol, routes, SSE, tokenization. Never imports torch."""

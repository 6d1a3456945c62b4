"""``POST /v1/chat/completions``: the request, the prompt from the chat template, tool choice, the route."""

"""``POST /v1/completions`` (legacy): raw prompts, fill-in-the-middle, the route."""

"""`hfserve chat`: an interactive client for hfserve and any OpenAI-compatible server."""

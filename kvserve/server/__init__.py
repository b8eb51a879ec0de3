"""The OpenAI-compatible HTTP server (FastAPI): protocol schemas, the async engine loop, metrics, the app."""

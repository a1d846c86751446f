"""Where a program's model calls go: an in-process Engine, a radixrt server, an OpenAI-compatible API."""

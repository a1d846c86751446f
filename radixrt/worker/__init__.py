"""The worker: requests, scheduling, grammars, sampling; inline or in its own process."""

"""The worker: requests, scheduling, grammars, sampling; inline or in its own process."""

from radixrt.worker.worker import Worker

__all__ = ["Worker"]

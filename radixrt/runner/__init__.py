"""The model side of a step: weights, KV pool, attention backend, one forward pass."""

from radixrt.runner.model_runner import ModelRunner, load_model
from radixrt.runner.step_batch import PromptRows, SampleRow, StepBatch

__all__ = ["ModelRunner", "PromptRows", "SampleRow", "StepBatch", "load_model"]

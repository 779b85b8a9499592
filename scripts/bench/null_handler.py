"""A TorchServe handler that answers a constant: the frontend + worker IPC limit, with no model.

Served with the same batchSize/maxBatchDelay/workers and the same client as the model, it tells
how many requests per second TorchServe's Java frontend, its Python workers and their socket
protocol pass at all; the served model cannot go faster than that or than the network alone.
Its archive carries the ``handler`` package for the answer contract only.
"""

from handler.answer import Answer, ModelInfo

ANSWER = Answer(0, 0, (), ModelInfo("null", "1.0")).to_json()


def handle(data, context):
    """One constant answer per request of the batch (``None`` at load time)."""
    if data is None:
        return None
    return [ANSWER for _ in data]

"""A TorchServe handler that answers a constant: the frontend + worker IPC limit, with no model.

Served with the same batchSize/maxBatchDelay/workers and the same client as the model, it tells
how many requests per second TorchServe's Java frontend, its Python workers and their socket
protocol pass at all; the served model cannot go faster than that or than the network alone.
"""

ANSWER = {"model": {"name": "null", "version": "1.0"}, "image": {"width": 0, "height": 0}, "detections": []}


def handle(data, context):
    """One constant answer per request of the batch (``None`` at load time)."""
    if data is None:
        return None
    return [ANSWER for _ in data]

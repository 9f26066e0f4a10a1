"""Postprocessing of a classifier's output row: the top-k classes with their scores (docs/protocol.md)."""

from __future__ import annotations

import numpy as np

from agent.protocol.schemas import TopK


def outputs_probabilities(rows: np.ndarray) -> bool:
    """A model whose outputs are already probabilities (non-negative, each row summing to 1, within
    what uint8 quantisation loses); decided once per tenant at warm-up, not frame by frame."""
    rows = rows.reshape(rows.shape[0], -1).astype(np.float64)
    return bool(rows.min() >= 0.0 and np.abs(rows.sum(axis=1) - 1.0).max() < 0.02)


def top_k(logits: np.ndarray, labels: tuple[str, ...], k: int, probabilities: bool = False) -> list[TopK]:
    """Scores of the k best classes, best first: softmax of logits, or the model's own
    probabilities when it outputs them."""
    logits = logits.astype(np.float64, copy=False)
    if probabilities:
        probs = logits
    else:
        exp = np.exp(logits - logits.max())
        probs = exp / exp.sum()
    k = min(k, probs.size)
    best = np.argpartition(-probs, k - 1)[:k]
    best = best[np.argsort(-probs[best])]
    return [
        TopK(index=int(i), label=labels[i] if i < len(labels) else str(i), score=round(float(probs[i]), 6))
        for i in best
    ]

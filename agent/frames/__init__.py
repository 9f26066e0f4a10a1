"""The frame path: a frame in, its tenant, batching, inference, one answer out."""

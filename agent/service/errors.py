"""The agent's own exceptions share one root, `AgentError`, so callers can catch them together.

Runtime failures stay rooted in `backends.base.BackendError`: backends never import the agent.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of the errors the agent raises on purpose; the message says what to fix."""


class PlacementRefused(AgentError):
    """A placement document that cannot be applied; the current placement keeps serving."""

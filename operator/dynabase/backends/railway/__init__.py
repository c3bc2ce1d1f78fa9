"""Railway's public GraphQL API: the client (budget, retries) and the backend (observe, apply)."""

from .backend import EnvironmentObserved, OwnService, RailwayBackend
from .client import BudgetExhausted, RailwayAuth, RailwayClient, RailwayError, RateLimited

__all__ = [
    "BudgetExhausted", "EnvironmentObserved", "OwnService", "RailwayAuth", "RailwayBackend", "RailwayClient",
    "RailwayError", "RateLimited",
]

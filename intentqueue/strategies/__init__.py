"""Strategies: which intents the solver accepts, and at what fee.

``get_strategy(name)`` returns the configured strategy; see ``base`` for the classes a
custom strategy builds on and ``standard`` for the options of the standard strategy.
"""

from intentqueue.strategies.base import (
    FeeBreakdown,
    Issue,
    IssueKind,
    Quote,
    Strategy,
    Validation,
    ValidationReport,
)
from intentqueue.strategies.registry import check_strategies, get_strategy, strategy_names

__all__ = [
    "FeeBreakdown",
    "Issue",
    "IssueKind",
    "Quote",
    "Strategy",
    "Validation",
    "ValidationReport",
    "check_strategies",
    "get_strategy",
    "strategy_names",
]

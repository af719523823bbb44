"""The standard strategy: stablecoin routes delivered by plain ERC-20 transfers.

Options (all optional), under ``INTENTQUEUE["strategies"]["standard"]["options"]``:

| option                  | meaning                                                     |
|-------------------------|-------------------------------------------------------------|
| ``fee``                 | ``{"flat": amount, "bps": 0..9999}``; default no fee        |
| ``expiry_buffer_seconds`` | deadlines must lie this far beyond now; default 300       |
| ``supported_chains``    | chain ids; default the keys of ``INTENTQUEUE["chains"]``    |
| ``route_allow``         | ``["src:dst", ...]``, ``*`` for any; default all routes     |
| ``route_deny``          | ``["src:dst", ...]``; wins over ``route_allow``             |
| ``allowed_tokens``      | ``{"<dst chain id>": [token, ...]}``; default any token     |
| ``token_limits``        | ``{token: max route amount}``; default no limit             |
| ``allowed_provers``     | ``[prover, ...]``; default any prover                       |
| ``wallet_type``         | wallet whose balance is checked; default ``basic``          |

Besides the off-chain checks it runs the on-chain ones of ``onchain``: the reward is
funded on the source chain, the solver holds the route on the destination chain, and
the route names the destination's portal (and prover and tokens, when configured).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from intentqueue.strategies import onchain, validations
from intentqueue.strategies.base import Strategy, Validation

if TYPE_CHECKING:
    from intentqueue.models import Intent


class StandardStrategy(Strategy):
    """Accepts any intent and runs the original standard strategy's checks."""

    supports_quote = True
    supports_native_value = False

    validation_classes: ClassVar[Sequence[type[Validation]]] = (
        validations.NoDuplicateRewardTokens,
        validations.NotExpired,
        validations.SupportedChains,
        validations.RouteEnabled,
        validations.RouteTokens,
        validations.AmountLimits,
        validations.ProverAllowed,
        validations.Profitable,
        onchain.IntentFunded,
        onchain.SolverBalance,
        onchain.PortalSupported,
    )

    def can_handle(self, intent: Intent) -> bool:
        """Every intent: the standard strategy is the fallback."""
        return True

    def check(self) -> list[str]:
        """Warn when no chain is supported: every intent would be rejected."""
        if validations.SupportedChains.chain_ids(self):
            return []
        return [
            f"{self.settings_path}: no supported chains, every intent will be rejected "
            f"(set options.supported_chains or configure INTENTQUEUE.chains)"
        ]

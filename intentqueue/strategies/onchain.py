"""Validations that read a chain: funding, the solver's balance, the destination's portal.

They are ``on_chain`` validations: ``Strategy.run_validations`` runs them concurrently
(each waits on RPC round trips) and reports their issues with everyone else's. Each
needs the chain it reads to be configured in ``INTENTQUEUE["chains"]``; an intent for a
chain that is not configured cannot be checked, and could not be executed either, so it
is a permanent issue.

RPC errors are classified (``intentqueue.chain.client.classify``): a connection refused
or reset raises ``NetworkError`` out of the validation run (the job is retried at once),
a timeout or another temporary node error becomes a temporary issue (retried with
backoff), and a missing solver key is a ``PermanentError`` (the job goes to the
dead-letter queue: the intent is not at fault).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from django.core.exceptions import ImproperlyConfigured
from eth_utils import to_checksum_address

from intentqueue.chain.client import get_client
from intentqueue.chain.config import ChainConfig, ChainNotConfigured, get_chain
from intentqueue.chain.wallets import DEFAULT_WALLET, get_wallet
from intentqueue.exceptions import PermanentError
from intentqueue.strategies.base import (
    Issue,
    IssueKind,
    Option,
    OptionError,
    Validation,
    to_amount,
    token_amounts,
)

if TYPE_CHECKING:
    from intentqueue.models import Intent
    from intentqueue.strategies.base import Strategy


def parse_wallet_type(value: Any) -> str:
    """A wallet type name (a key of ``INTENTQUEUE["wallets"]``)."""
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise OptionError(f"expected a wallet type name, got {value!r}")
    return value


class ChainValidation(Validation):
    """Base of the validations that read a chain."""

    on_chain = True

    def chain(self, chain_id: int, role: str) -> tuple[ChainConfig | None, list[Issue]]:
        """The configuration of the intent's ``role`` chain, or the issue that it has none."""
        try:
            return get_chain(chain_id), []
        except ChainNotConfigured:
            return None, [
                self.issue(
                    f"{role} chain {chain_id} is not configured (INTENTQUEUE['chains']"
                    f"['{chain_id}'] with rpc_url and portal)"
                )
            ]
        except ImproperlyConfigured as error:
            raise PermanentError(f"chain {chain_id} is misconfigured: {error}") from error


class IntentFunded(ChainValidation):
    """The reward is escrowed in the portal of the source chain (``isIntentFunded``).

    Not funded yet is temporary: creators fund after publishing, and the job is
    retried with backoff. Quotes skip it (nothing is funded before a quote).
    """

    name = "intent_funded"
    skip_in_quote = True

    def check(self, intent: Intent, strategy: Strategy) -> list[Issue]:
        chain, issues = self.chain(intent.source_chain_id, "source")
        if chain is None:
            return issues
        if get_client(chain.chain_id).is_funded(intent.hash):
            return []
        return [
            self.issue(
                f"the reward is not funded in portal {chain.portal} on chain {chain.chain_id} yet",
                IssueKind.TEMPORARY,
            )
        ]


class SolverBalance(ChainValidation):
    """The solver holds the route's tokens and native amount on the destination chain.

    Short is temporary (the solver may be refilled); the wallet checked is the strategy's
    ``wallet_type`` option (``basic`` by default).
    """

    name = "solver_balance"
    options_spec: ClassVar[Mapping[str, Option]] = {
        "wallet_type": Option(
            parse_wallet_type, default=DEFAULT_WALLET, help="the wallet that executes"
        ),
    }

    def check(self, intent: Intent, strategy: Strategy) -> list[Issue]:
        chain, issues = self.chain(intent.destination_chain_id, "destination")
        if chain is None:
            return issues
        solver = get_wallet(strategy.options["wallet_type"]).address
        client = get_client(chain.chain_id)
        needed: defaultdict[str, int] = defaultdict(int)
        for token, amount in token_amounts(intent.route_tokens, "route_tokens"):
            needed[to_checksum_address(token)] += amount
        for token, amount in needed.items():
            held = client.token_balance(token, solver)
            if held < amount:
                issues.append(
                    self.issue(
                        f"solver {solver} holds {held} of {token} on chain {chain.chain_id}, "
                        f"the route needs {amount}",
                        IssueKind.TEMPORARY,
                    )
                )
        native = to_amount(intent.route_native_amount, "route_native_amount")
        if native:
            held = client.balance(solver)
            if held < native:
                issues.append(
                    self.issue(
                        f"solver {solver} holds {held} wei on chain {chain.chain_id}, the "
                        f"route needs {native}",
                        IssueKind.TEMPORARY,
                    )
                )
        return issues


class PortalSupported(ChainValidation):
    """The destination chain is configured, the route names its portal (a contract on
    chain), the reward's prover is the chain's ``prover`` (when set) and the route's
    tokens are among the chain's ``tokens`` (when set). All permanent."""

    name = "portal_supported"

    def check(self, intent: Intent, strategy: Strategy) -> list[Issue]:
        chain, issues = self.chain(intent.destination_chain_id, "destination")
        if chain is None:
            return issues
        where = f"chain {chain.chain_id}"
        if intent.route_portal.lower() != chain.portal.lower():
            issues.append(
                self.issue(
                    f"route portal {intent.route_portal} is not the portal of {where} "
                    f"({chain.portal})"
                )
            )
        elif not get_client(chain.chain_id).has_code(chain.portal):
            issues.append(self.issue(f"no contract at portal {chain.portal} on {where}"))
        if chain.prover is not None and intent.reward_prover.lower() != chain.prover.lower():
            issues.append(
                self.issue(
                    f"prover {intent.reward_prover} is not the prover of {where} ({chain.prover})"
                )
            )
        if chain.tokens:
            allowed = {token.lower() for token in chain.tokens}
            for token, _ in token_amounts(intent.route_tokens, "route_tokens"):
                if token not in allowed:
                    issues.append(self.issue(f"route token {token} is not served on {where}"))
        return issues


#: The on-chain validations, in the order they are reported.
ON_CHAIN_VALIDATIONS: tuple[type[Validation], ...] = (IntentFunded, SolverBalance, PortalSupported)

"""Chains: client, wallets, nonce allocation and our contracts."""

"""Beeline router: the HTTP API internal services call to send messages, query presence and administer."""

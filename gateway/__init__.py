"""Beeline gateway: WebSocket connections, presence registration, the node-stream consumer, delivery."""

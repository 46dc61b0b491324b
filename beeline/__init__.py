"""The ``beeline`` command: composes the gateway and router services, plus demo and bench tools."""

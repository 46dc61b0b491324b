"""Observability: metric names and labels, end-to-end latency, the Grafana dashboard and the Prometheus
rules, checked against real gateway/router processes, a real Prometheus and promtool."""

"""Observability: Prometheus metrics, the entropy-collapse tracker, Grafana dashboards and the run report."""

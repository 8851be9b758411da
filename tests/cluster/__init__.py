"""The real control plane for Kubernetes-facing tests: tests/cluster/README.md says how to build and use it."""

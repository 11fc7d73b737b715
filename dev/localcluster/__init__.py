"""A real single-node Kubernetes built from source on this machine, without Docker (see docs/CLUSTER.md)."""

"""Pure builders: spec in, Kubernetes manifests out. No I/O, table-tested."""

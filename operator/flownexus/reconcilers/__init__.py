"""Reconcilers: read the world through ``kube``, decide with builders, return the status to write."""

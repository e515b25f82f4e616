"""Peer engines run on nxserve's workloads (see README.md). Keep this file free of imports: the vLLM
worker imports bench.peers.method inside vLLM's own virtualenv, where nxserve is not installed."""

"""Rank discovery, process spawning, failure propagation and the `shardserve` CLI."""

"""Checkpoint reading, per-architecture sharding rules, shard writing and verification."""

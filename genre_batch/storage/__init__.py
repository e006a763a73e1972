"""The store: its layout and conditional writes, the run lease, the feature store (parts, track index, plan, compaction)."""

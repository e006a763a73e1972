"""The music library: discovery of its files, labels from its tags or a CSV, write-back of genre tags, synthetic libraries."""

"""What readers get: tagging, catalog snapshots and change feed, vector spaces, similar tracks, queries."""

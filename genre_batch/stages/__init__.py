"""The stages of a run (extract, compact, train, tag) and its run record, callable with or without Prefect."""

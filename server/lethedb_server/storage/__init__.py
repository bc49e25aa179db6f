"""What is on disk: LMDB environments, the log and key tables, the record codec and the
page checker. Knows nothing of the engine above it."""

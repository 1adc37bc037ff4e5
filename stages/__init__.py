"""The stages of the pipeline; each is run by one CLI command and none imports another."""

"""Retraining jobs without HTTP: the job store, where a job runs (runners) and what a request may set."""

"""The admin API (HTTP only): retrain, jobs, adapters, promote and rollback."""

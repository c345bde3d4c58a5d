"""PreSafe training pipeline: teacher decisions, decision classifier, LoRA alignment, evaluation."""

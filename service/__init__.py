"""PreSafe gateway and the torch-free pieces shared with training (settings, assets, decisions)."""

"""The training program: frozen parts, Q-Former pre-training (stage 1 and 2) and its run directory,
evaluation, export."""

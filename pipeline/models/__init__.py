"""Model families, checkpoints and exports."""

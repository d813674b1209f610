"""Stage 2, models: the three networks, the losses, and checkpoints (saving, loading, rebuilding a
trained or structurally pruned model)."""

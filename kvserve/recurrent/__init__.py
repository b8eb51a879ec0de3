"""Recurrent-state support for hybrid models: where to checkpoint states (placement) and the checkpoint store."""

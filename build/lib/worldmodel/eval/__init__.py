"""Evaluation: metrics, rollouts of checkpoints against held-out clips, reports."""

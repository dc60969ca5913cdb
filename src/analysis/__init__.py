"""Offline analyses over stored evaluation results (no model, no GPU)."""

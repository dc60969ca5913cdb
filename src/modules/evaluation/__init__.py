"""Evaluation: grading responses, the validation metrics, and test-time scaling over stored samples."""

"""Baseline predictors scored by the iclgym harness (each implements ``predict(batch)``)."""

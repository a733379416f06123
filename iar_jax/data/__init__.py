"""Datasets, preprocessing, code extraction and training input."""

"""Recap: re-caption web image-text datasets."""

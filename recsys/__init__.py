"""Shared building blocks of the recommender pipeline: dataset spec, settings, atomic outputs, CLI."""

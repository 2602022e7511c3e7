"""Model definitions (Merlin Models on TensorFlow) and the serving stages, for the trainer environment; the
format modules without heavy imports (`retrieval_index.py`) are read by the platform environment too."""

"""Model definitions (Merlin Models on TensorFlow); imported only in the trainer environment."""

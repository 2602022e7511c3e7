"""The serving tier: the Triton Inference Server launcher (`serving.triton_server`)."""

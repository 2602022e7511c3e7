"""The serving tier: the REST gateway (`serving.api`) and the Triton Inference Server launcher
(`serving.triton_server`)."""

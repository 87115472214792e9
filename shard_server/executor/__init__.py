"""Running the model: the builder of forward inputs, the runner that calls the forward, and the decode
CUDA graphs."""

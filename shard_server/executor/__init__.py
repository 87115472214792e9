"""Running the model: the runner that turns engine batches into ForwardBatches (model/forward_batch.py)
and runs them, and the decode CUDA graphs."""

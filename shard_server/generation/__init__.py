"""Turning logits into tokens and tokens into text: sampling and logits processors (penalties,
watermark), stopping criteria and incremental detokenization. No model, cache or gRPC imports."""

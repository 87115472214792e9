"""Local model kits for tests and the demo (no hub): tiny random Mistral models and PEFT adapters."""

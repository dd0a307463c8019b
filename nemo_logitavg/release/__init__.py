"""Release artifacts: the averaged-model bundle's transformers code (copied into every bundle) and the model card."""

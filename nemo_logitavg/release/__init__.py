"""Release artifacts: the averaged-model bundle (``bundle``: its layout, written and read), its transformers code
(``modeling_logit_averaged``, copied into every bundle) and the model card."""

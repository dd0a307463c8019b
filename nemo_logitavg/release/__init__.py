"""Release artifacts: the model card of a released Hugging Face directory or averaged-model bundle. The bundle
itself (its layout, written and read, and its transformers code) is ``nemo_logitavg.models.bundle``, below the
engines, the evaluation and this package, which all use it."""

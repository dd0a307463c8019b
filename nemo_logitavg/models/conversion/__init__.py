"""Weights between Hugging Face (transformers) directories and megatron-core ``GPTModel`` shards.

Where things are:

    models/families/         one mapping table per model family (Llama, Qwen2): the Hugging Face tensors, their
                             shapes and where each lives in megatron-core; the registry the builder checks
    conversion/mapping.py    Hugging Face names <-> megatron shards, read from the family's table (pure tensors:
                             hf_to_mcore_state_dict, mcore_to_hf_state_dict, hf_shapes, the bucket plan, checks)
    conversion/hf_files.py   safetensors reading and writing, config.json, the source's tokenizer files
    conversion/loading.py    weights into a live GPTModel (a megatron shard, or a Hugging Face directory)
    conversion/streaming.py  a live sharded model out as Hugging Face tensors, bucket by bucket (the push), and
                             as a Hugging Face directory (export_model_hf)
    conversion/mcore_checkpoint.py  the converter's Megatron checkpoint (convert_hf_to_mcore, convert_mcore_to_hf)

Import each function from its module; this package re-exports nothing.
"""

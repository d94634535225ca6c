"""Adapter formats and conversions: kohya/A1111 LoRA keys and single-file SD checkpoints, as pure dict->dict functions."""

"""sdtune trainers: LoRA (and later DreamBooth, ControlNet) over a frozen SD v1-5 base, on a small shared core."""

"""sdtune trainers: LoRA and DreamBooth (and later ControlNet) over a frozen SD v1-5 base, on a small shared core."""

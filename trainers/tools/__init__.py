"""Tools beside the trainers, not training methods: `pretrain_toy.py` builds the toy base; `kohya_import.py` (with
`kohya_inputs`, `kohya_translation`, `kohya_dataset`, `kohya_render`, and its key table in `kohya_keys.py`) turns
sd-scripts / kohya_ss configs into recipes (`sdtune recipe from-kohya`)."""

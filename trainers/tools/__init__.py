"""Tools that build what the trainers start from, not training methods: `pretrain_toy.py` builds the toy base."""

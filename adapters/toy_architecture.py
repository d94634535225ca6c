"""The toy base's architecture: the configs of its UNet, VAE, text encoder and noise schedule.

The bundled toy base (adapters/toy_base/, built by trainers/tools/pretrain_toy.py) is the SD v1-5 model families
scaled down for 64 px images and a CPU; these dicts are what its `*/config.json` files hold (tests check that they
agree). Tests build tiny random models from them, so those models have the toy base's exact layout.
"""

from __future__ import annotations

TOY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(64, 128),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=32,
)
TOY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    sample_size=64,
    layers_per_block=1,
    norm_num_groups=32,
    block_out_channels=(32, 64, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
TOY_TEXT_ENCODER = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=64,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)

# The SD v1-5 noise schedule, scheduler and pipeline settings, so that the toy base behaves like the real one.
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

#!/bin/sh
# sd-scripts LoRA from the command line, with a dataset config (datasets.toml).
accelerate launch --num_cpu_threads_per_process 1 train_network.py \
  --pretrained_model_name_or_path="runwayml/stable-diffusion-v1-5" \
  --dataset_config="datasets.toml" \
  --output_dir="DATA_DIR/model" --output_name=purple-circles \
  --save_model_as=safetensors --save_precision fp16 \
  --network_module=networks.lora --network_dim 8 --network_alpha 4 \
  --network_args "conv_dim=8" "conv_alpha=4" "down_lr_weight=1,1,1,1,1,1,1,1,1,1,1,1" \
  --network_train_unet_only \
  --learning_rate=1e-4 --optimizer_type="AdamW" \
  --optimizer_args "weight_decay=0.01" \
  --lr_scheduler=cosine_with_restarts --lr_scheduler_num_cycles 3 --lr_warmup_steps 0.1 \
  --max_train_steps=1000 --train_batch_size 2 --mixed_precision="bf16" --seed 7 \
  --loss_type=huber --huber_schedule=snr --huber_c=0.1 \
  --multires_noise_iterations 6 --multires_noise_discount 0.3 \
  --min_snr_gamma=5 --sdpa --cache_latents --persistent_data_loader_workers \
  --save_every_n_steps=250 --masked_loss --log_with tensorboard

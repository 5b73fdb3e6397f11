"""The network: the U-Net (`unet`), weights files (`weights`, `weights_path`), devices (`devices`)."""

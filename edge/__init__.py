"""What runs on the device. Never imports torch, SB3, models or server."""

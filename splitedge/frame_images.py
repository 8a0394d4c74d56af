"""How a raw uint8 (C, H, W) frame becomes one PNG/JPEG image: the wire contract that the
device's encoder (edge/wire.py) and the server's decoder (server/validation.py) both follow.

C = 1, 3, 4 go as the image's channels (L, RGB, RGBA); any other C (2, 5+, and 4 for JPEG,
which has no 4-channel mode) goes as one grey image of the planes stacked vertically.
"""

from __future__ import annotations

PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def stacks_planes(channels: int, codec: str) -> bool:
    """True when the C planes go as one grey (C*H) x W image; codec is png or jpeg, any case."""
    return channels not in PIL_MODES or (codec.lower() == "jpeg" and channels == 4)


def image_mode_and_height(channels: int, height: int, codec: str) -> tuple[str, int]:
    """The Pillow mode and the pixel height of the image carrying a (C, H, W) frame."""
    if stacks_planes(channels, codec):
        return "L", channels * height
    return PIL_MODES[channels], height

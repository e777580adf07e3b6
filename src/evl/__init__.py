"""evl: video recognition on top of CLIP image encoders (EVL, ViFi-CLIP, X-CLIP)."""

__version__ = "0.1.0"

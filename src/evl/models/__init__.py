"""Models: the CLIP image encoder, the EVL decoder, and the registry that builds them."""

"""Decode: image bytes to the model's uint8 pixels, in CPU tasks (`decode`, Pillow), or JPEGs
in batches on the inference actor's device (`device_decode`, nvJPEG)."""

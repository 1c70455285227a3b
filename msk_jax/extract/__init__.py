"""Feature extraction from raw videos into the HowTo100M layout: decoding as the original
extractor's ffmpeg graphs (`video`), frame backbones (`backbones`, and the demo corpus's own
frame features in `demo`), and the command line `python -m msk_jax.extract` (`extractor`)."""

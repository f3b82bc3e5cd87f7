"""Speech recognition: model loading, voice activity detection, the batch executor."""

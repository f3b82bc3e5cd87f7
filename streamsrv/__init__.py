"""streamsrv: live call transcription for Asterisk AudioSocket."""

"""Audio input: decoding (decode.py), features (features.py, mel.py), VAD (vad.py).

Submodules are imported explicitly (e.g. `from app.audio.decode import decode_audio`) so
that importing the package does not pull in torch or FFmpeg.
"""

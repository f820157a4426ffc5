"""Turn a Whisper checkpoint (CTranslate2, Hugging Face, openai-whisper) into an engine directory.

The entry point is `build.build_engine`; `build_engines.py` is its command line.
"""

"""Numbers fixed by the Whisper model family and by OpenAI's API, defined once for every layer.

The encoder sees 30 s windows at 100 mel frames a second; its stride-2 convolution halves that,
so one audio position (and one timestamp token) is 20 ms.
"""

from __future__ import annotations

SAMPLE_RATE: int = 16000
N_FFT: int = 400
HOP_LENGTH: int = 160
CHUNK_LENGTH: int = 30  # seconds of audio in one encoder window
N_SAMPLES: int = CHUNK_LENGTH * SAMPLE_RATE  # 480000
N_FRAMES: int = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
FRAMES_PER_SECOND: int = SAMPLE_RATE // HOP_LENGTH  # 100 (10 ms per mel frame)
# The encoder halves the frame rate (stride-2 conv), so one audio token = 20 ms, which is
# also the resolution of Whisper's timestamp tokens.
TOKENS_PER_SECOND: int = FRAMES_PER_SECOND // 2  # 50
TIME_PRECISION: float = 1.0 / TOKENS_PER_SECOND  # 0.02 s

#: Tokens one window may sample: half of the decoder's 448-position text context, the other
#: half being left to the prompt (openai-whisper's `sample_len`).
MAX_NEW_TOKENS: int = 224

#: Bytes in a MiB: the *_MB settings count MiB, as OpenAI's 25 MB upload limit does.
MIB: int = 1024 * 1024

#: OpenAI's model name; clients written for OpenAI send it, so it names our default model.
OPENAI_ALIAS = "whisper-1"

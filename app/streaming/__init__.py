"""Realtime (WebSocket) transcription: OpenAI Realtime protocol, turns, partial transcripts."""
